"""How the app is served: upload limits, a bounded queue, a temporary-file lifetime, who may log in, and which browser
may fetch which file. CTs are patient data, so a server shared by several people must not let one of them read
another's uploads, and must not keep them longer than it needs.

    limits = ServerLimits()                                   # the defaults the README states
    credentials = server_credentials(host, auth_file)     # one sentence when a non-loopback host has none
    demo = build_app(...); demo.queue(**limits.queue_kwargs())
    demo.launch(**limits.launch_kwargs(), auth=credentials, app_kwargs=private_files_app_kwargs())

Gradio serves every file it shows or receives (uploads, rendered CT planes, downloads) from its temporary folder at
`/gradio_api/file=<path>`, to anyone who knows the URL. `PrivateFiles` (an ASGI middleware) ties each such file to the
browser it was made for: every browser gets a random HttpOnly cookie; a path that leaves the server in a response to
that browser (an upload's answer, an event's output) is recorded as that cookie's; a request for a temporary file from
any other cookie gets 404, as if the file did not exist. Written by hand because Gradio has no per-session file
access (its URLs are capabilities) and no library adds one.
"""
from __future__ import annotations

import ipaddress
import os
import re
import secrets
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import unquote

from engine.errors import UserError

AUTH_ENV = "CT_WORKSTATION_AUTH"            # "user:password", several separated by commas
AUTH_FILE_ENV = "CT_WORKSTATION_AUTH_FILE"  # a file of "user:password" lines (same as --auth-file)


@dataclass(frozen=True)
class ServerLimits:
    """What one app process accepts. Sizes in MB of 2**20 bytes (as the browser reports them), times in seconds."""

    max_upload_mb: int = 512      # one upload; a chest CT series is 50-300 MB as DICOM, a radiograph a few MB
    concurrency: int = 2          # requests computed at once (the machine this runs on has 2 cores)
    queue_size: int = 16          # requests waiting beyond those; the next one is told the app is busy
    cache_sweep_s: int = 300      # how often temporary files are checked
    cache_max_age_s: int = 1800   # a temporary file (upload, rendered plane, download) older than this is deleted

    def queue_kwargs(self) -> dict:
        return {"default_concurrency_limit": self.concurrency, "max_size": self.queue_size}

    def blocks_kwargs(self) -> dict:
        return {"delete_cache": (self.cache_sweep_s, self.cache_max_age_s)}

    def launch_kwargs(self) -> dict:
        return {"max_file_size": f"{self.max_upload_mb}mb"}  # Gradio reads "mb" as 2**20 bytes, as browsers show it

    def summary(self) -> str:
        return (f"uploads up to {self.max_upload_mb} MB; {self.concurrency} requests at a time, {self.queue_size} "
                f"waiting; temporary files deleted after {self.cache_max_age_s // 60} min")


# ------------------------------------------------------------------------------------------------ who may come in

def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost': addresses no other machine can reach."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _parse_pairs(lines: list[str], where: str) -> list[tuple[str, str]]:
    pairs = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise UserError(f"Each credential in {where} must read user:password (a non-empty user and password).")
        pairs.append((user.strip(), password))
    if not pairs:
        raise UserError(f"{where} holds no user:password credential.")
    return pairs


def read_credentials(auth_file: str | None = None, environ=None) -> list[tuple[str, str]] | None:
    """Login credentials from --auth-file / $CT_WORKSTATION_AUTH_FILE (lines of user:password) or from
    $CT_WORKSTATION_AUTH (user:password[,user2:password2]); None when none is set. Never from the command line,
    where other users of the machine could read them in the process list."""
    environ = os.environ if environ is None else environ
    auth_file = auth_file or environ.get(AUTH_FILE_ENV)
    if auth_file:
        path = Path(auth_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            raise UserError(f"The credentials file '{path}' cannot be read.") from None
        return _parse_pairs(text.splitlines(), f"the credentials file '{path}'")
    if environ.get(AUTH_ENV):
        return _parse_pairs(environ[AUTH_ENV].split(","), f"${AUTH_ENV}")
    return None


def server_credentials(host: str, auth_file: str | None = None, environ=None) -> list[tuple[str, str]] | None:
    """The credentials the server requires; a server reachable from other machines must have some."""
    credentials = read_credentials(auth_file, environ)
    if credentials is None and not is_loopback(host):
        raise UserError(f"Listening on {host} would show patient CTs to anyone on the network: set {AUTH_ENV}="
                        f"user:password or --auth-file FILE (lines of user:password) to require a login, or "
                        f"listen on 127.0.0.1.")
    return credentials


# --------------------------------------------------------------------------------------- which browser gets which file

def temporary_folders() -> list[str]:
    """Where Gradio keeps the files it serves: its upload/cache folder ($GRADIO_TEMP_DIR or <tmp>/gradio)."""
    folder = os.environ.get("GRADIO_TEMP_DIR") or str(Path(tempfile.gettempdir()) / "gradio")
    return [os.path.realpath(folder)]


class PrivateFiles:
    """ASGI middleware: a temporary file is served only to the browser (cookie) whose responses named it."""

    COOKIE = "ctws_client"
    SCANNED_TYPES = (b"application/json", b"text/event-stream", b"text/html")
    MAX_FILES = 200_000  # owners remembered (oldest forgotten first; a forgotten file is no longer served)

    def __init__(self, app, folders: list[str] | None = None):
        self.app = app
        self.folders = folders or temporary_folders()
        alternatives = "|".join(re.escape(f) for f in sorted(self.folders, key=len, reverse=True))
        self._paths = re.compile(rf"(?:{alternatives})/[^\"'\\\s?#<>]+")
        # path -> the browsers it was sent to (Gradio names files by their content, so two browsers that render the
        # same picture are sent the same path)
        self._owners: OrderedDict[str, set[str]] = OrderedDict()
        self._lock = threading.Lock()

    def _is_temporary(self, path: str) -> bool:
        return any(path == f or path.startswith(f + "/") for f in self.folders)

    def _record(self, client: str, body: bytes) -> None:
        found = {os.path.normpath(unquote(m)) for m in self._paths.findall(body.decode("utf-8", "replace"))}
        if not found:
            return
        with self._lock:
            for path in found:
                self._owners.setdefault(path, set()).add(client)
                self._owners.move_to_end(path)
            while len(self._owners) > self.MAX_FILES:
                self._owners.popitem(last=False)

    def may_fetch(self, client: str, path: str) -> bool:
        """True when `path` was named in a response to `client`."""
        with self._lock:
            return client in self._owners.get(os.path.normpath(path), ())

    @classmethod
    def _client(cls, headers: list[tuple[bytes, bytes]]) -> str | None:
        for name, value in headers:
            if name == b"cookie":
                morsel = SimpleCookie(value.decode("latin-1")).get(cls.COOKIE)
                if morsel and re.fullmatch(r"[A-Za-z0-9_-]{32,64}", morsel.value):
                    return morsel.value
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client = self._client(scope.get("headers", []))
        new_client = None
        if client is None:
            client = new_client = secrets.token_urlsafe(32)
        path = scope.get("path", "")
        if "/file=" in path:
            requested = os.path.normpath(os.path.realpath(unquote(path.split("/file=", 1)[1])))
            if self._is_temporary(requested) and not self.may_fetch(client, requested):
                return await _not_found(send)
        scanned = False

        async def send_and_record(message):
            nonlocal scanned
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                content_type = next((v for k, v in headers if k == b"content-type"), b"")
                scanned = any(content_type.startswith(t) for t in self.SCANNED_TYPES)
                if new_client:
                    headers.append((b"set-cookie", f"{self.COOKIE}={new_client}; Path=/; HttpOnly; "
                                                   f"SameSite=Strict".encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and scanned and message.get("body"):
                self._record(client, message["body"])
            await send(message)

        await self.app(scope, receive, send_and_record)


async def _not_found(send) -> None:
    body = b'{"detail": "Not Found"}'
    await send({"type": "http.response.start", "status": 404,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def save_pil_to_cache_atomically(img, cache_dir: str, name: str = "image", format: str = "webp") -> str:
    """gradio.processing_utils.save_pil_to_cache without its race: the same content-addressed path, but an image
    already cached is never rewritten (only touched, so the cache sweep ages it from its last use, as Gradio's own
    save_file_to_cache does), and a new one is written under a temporary name and renamed into place.

    Why by hand: Gradio 6.31 rewrites the cached file in place (write_bytes truncates it) whenever the same picture is
    produced again, e.g. a CT plane or a film shown twice; a browser still downloading the first copy then gets fewer
    bytes than the Content-Length it was promised, and the server logs h11's "Too little data for declared
    Content-Length" (or "Too much data" when the file grows back under it)."""
    from gradio import processing_utils

    data = processing_utils.encode_pil_to_bytes(img, format)
    folder = Path(cache_dir) / processing_utils.hash_bytes(data)
    folder.mkdir(exist_ok=True, parents=True)
    target = (folder / f"{name}.{format}").resolve()
    try:
        if target.stat().st_size == len(data):     # same hash and size: the same bytes, possibly being served now
            os.utime(target)
            return str(target)
    except OSError:
        pass                                       # not cached yet (or swept meanwhile): write it
    partial = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.partial")
    partial.write_bytes(data)
    os.replace(partial, target)                    # atomic: a reader has the old file or the new one, whole
    return str(target)


def install_atomic_image_cache() -> None:
    """Route Gradio's image caching (Image, Gallery, AnnotatedImage: all call processing_utils.save_pil_to_cache,
    numpy arrays through save_img_array_to_cache) through save_pil_to_cache_atomically. Idempotent."""
    from gradio import processing_utils

    processing_utils.save_pil_to_cache = save_pil_to_cache_atomically


def private_files_app_kwargs() -> dict:
    """Gradio's `app_kwargs` that install PrivateFiles inside its own middleware (it sees uncompressed bodies)."""
    from starlette.middleware import Middleware

    return {"middleware": [Middleware(PrivateFiles)]}
