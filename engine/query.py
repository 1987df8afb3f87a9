"""Checks on a user's query text, before any model is loaded: bad queries answer at once with one sentence."""
from __future__ import annotations

from engine.errors import UserError

MAX_QUERY_CHARS = 20_000  # a long CT-RATE report is ~8,000 characters; 100 kB of text is not a report


def check_query_text(text: str) -> str:
    """A query must be English report text of sensible length: one clear sentence otherwise.

    The one rule for "English" (the models read English reports only): at least 80 % of the letters are ASCII
    letters, and a query of 4 or more words has at least a third of its words among common English function words
    and radiology terms (engine.labels.english_word_share). So Chinese or Russian fail the first test, German or
    French reports the second, and English with a few accented names ("Löfgren syndrome") passes both."""
    from engine.labels import english_word_share

    if text is None or not str(text).strip():
        raise UserError("The query is empty: type or paste a report, or a few words such as 'right pleural effusion'.")
    text = " ".join(str(text).split())
    if any("\ud800" <= c <= "\udfff" for c in text):  # undecodable bytes (argv's surrogate escapes)
        raise UserError("The query holds bytes that are not valid UTF-8 text; paste it again as plain text.")
    if len(text) > MAX_QUERY_CHARS:
        raise UserError(f"The query is {len(text):,} characters long; a report is at most {MAX_QUERY_CHARS:,}.")
    letters = [c for c in text if c.isalpha()]
    if not letters:
        raise UserError("The query has no words: type or paste report text.")
    latin = sum(c.isascii() for c in letters) / len(letters)
    n_words, english = english_word_share(text)
    if latin < 0.8 or (n_words >= 4 and english < 1 / 3):
        raise UserError("The query does not look like English (at least 80 % of its letters must be a-z and, from 4 "
                        "words on, a third of its words common English or radiology words); the models read "
                        "English radiology reports only.")
    return text
