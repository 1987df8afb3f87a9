"""The one exception type a user ever sees: its message is a single clear sentence, never a traceback."""


class UserError(Exception):
    """Bad input or an impossible request. `str(err)` is one sentence meant for the user.

    The CLI prints it as {"error": "..."} with exit status 2; the app shows it as a notification.
    """
