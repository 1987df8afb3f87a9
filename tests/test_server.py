"""The app as a shared server (app/server.py): who may log in, which browser may fetch which file, how long files
live, how large an upload may be, and what eight people at once get. Every server here listens on 127.0.0.1 only."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from app.server import PrivateFiles, is_loopback, read_credentials, server_credentials
from engine.errors import UserError
from tests.browser import ROOT, running_app

# ------------------------------------------------------------------------------------------------- credentials


def test_loopback_addresses():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost", "LOCALHOST"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.4", "10.0.0.1", "example.org", ""))


def test_credentials_from_environment_or_file(tmp_path):
    assert read_credentials(environ={}) is None
    assert read_credentials(environ={"CT_WORKSTATION_AUTH": "ana:s3cret, bo:x:y"}) == [("ana", "s3cret"),
                                                                                      ("bo", "x:y")]
    creds = tmp_path / "users.txt"
    creds.write_text("# radiologists\nana:one\n\nbo:two\n")
    assert read_credentials(str(creds), environ={}) == [("ana", "one"), ("bo", "two")]
    assert read_credentials(environ={"CT_WORKSTATION_AUTH_FILE": str(creds)}) == [("ana", "one"), ("bo", "two")]
    for bad in ("ana", ":pw", "ana:", ",,"):
        with pytest.raises(UserError, match="user:password|no user:password"):
            read_credentials(environ={"CT_WORKSTATION_AUTH": bad})
    with pytest.raises(UserError, match="cannot be read"):
        read_credentials(str(tmp_path / "missing.txt"), environ={})


def test_a_server_reachable_from_other_machines_needs_credentials():
    assert server_credentials("127.0.0.1", environ={}) is None
    with pytest.raises(UserError, match="CT_WORKSTATION_AUTH"):
        server_credentials("0.0.0.0", environ={})
    assert server_credentials("0.0.0.0", environ={"CT_WORKSTATION_AUTH": "ana:pw"}) == [("ana", "pw")]


def test_app_refuses_to_listen_on_all_addresses_without_credentials():
    """One sentence, exit status 2, before any model or port is touched."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "app.py", "--host", "0.0.0.0", "--port", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.strip().count("\n") == 0
    assert "CT_WORKSTATION_AUTH" in done.stderr and time.monotonic() - started < 30


# ------------------------------------------------------------------------------------------- private temporary files

def _asgi_app(body: bytes, content_type: bytes = b"application/json"):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]})
        await send({"type": "http.response.body", "body": body})
    return app


async def _call(middleware, path: str, cookie: str | None = None) -> tuple[int, dict]:
    sent = []
    headers = [(b"cookie", f"{PrivateFiles.COOKIE}={cookie}".encode())] if cookie else []

    async def send(message):
        sent.append(message)

    await middleware({"type": "http", "path": path, "headers": headers}, None, send)
    start = sent[0]
    return start["status"], dict((k.decode(), v.decode()) for k, v in start["headers"])


# ------------------------------------------------------------------------------------ pictures shown twice

def _served_sizes_while_resaving(save, image, cache_dir: Path, seconds: float) -> list[tuple[int, int]]:
    """What a file server does (stat for the Content-Length, then read the body) on the cached picture, over and over,
    while another thread caches the same picture again and again: [(declared size, bytes read)] of every read."""
    path = Path(save(image, str(cache_dir)))
    stop, reads = threading.Event(), []

    def resave():
        while not stop.is_set():
            save(image, str(cache_dir))
    writer = threading.Thread(target=resave)
    writer.start()
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            declared = path.stat().st_size
            reads.append((declared, len(path.read_bytes())))
    finally:
        stop.set()
        writer.join()
    return reads


def test_a_picture_cached_again_is_never_rewritten_under_a_reader(tmp_path, monkeypatch):
    """Gradio 6.31 rewrites a cached picture in place each time the same picture is shown again; a browser fetching it
    meanwhile got fewer bytes than declared (h11 "Too little data for declared Content-Length", seen in a full-suite
    run of the chest X-ray browser test). The replacement keeps Gradio's content-addressed path, and a reader always
    gets what the size it was told promised. (Gradio's own function, run the same way for 2 s on this machine, gave
    203 short reads in 92,209; that half is not asserted, since a race need not show itself.)"""
    import numpy as np
    from gradio import processing_utils
    from PIL import Image

    from app.server import install_atomic_image_cache, save_pil_to_cache_atomically

    image = Image.fromarray((np.random.default_rng(0).random((512, 512, 3)) * 255).astype(np.uint8))
    path = Path(save_pil_to_cache_atomically(image, str(tmp_path)))
    data = processing_utils.encode_pil_to_bytes(image, "webp")
    assert path == (tmp_path / processing_utils.hash_bytes(data) / "image.webp").resolve()   # Gradio's own path
    assert path.read_bytes() == data
    inode = path.stat().st_ino
    reads = _served_sizes_while_resaving(save_pil_to_cache_atomically, image, tmp_path, seconds=1.0)
    assert reads and all(declared == got == len(data) for declared, got in reads)
    assert path.stat().st_ino == inode                       # the file being served was never replaced or rewritten
    path.write_bytes(data[:100])                             # a truncated leftover (a crash in Gradio's own writer)
    assert Path(save_pil_to_cache_atomically(image, str(tmp_path))).read_bytes() == data
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".partial")]

    install_atomic_image_cache()
    install_atomic_image_cache()                             # idempotent
    assert processing_utils.save_pil_to_cache is save_pil_to_cache_atomically
    # what install relies on: gr.Image's numpy pictures (as the tabs return them) reach the module attribute
    import gradio as gr
    calls = []
    monkeypatch.setattr(processing_utils, "save_pil_to_cache",
                        lambda *args, **kwargs: calls.append(args) or save_pil_to_cache_atomically(*args, **kwargs))
    shown = gr.Image(type="numpy").postprocess(np.asarray(image))
    assert len(calls) == 1 and Path(shown.path).read_bytes() == data


def test_private_files_middleware_by_hand(tmp_path):
    """A path named in a response to browser A is served to A only; files outside the temporary folder pass."""
    import asyncio

    folder = str(tmp_path / "gradio")
    secret = f"{folder}/abc123/patient.nii.gz"
    middleware = PrivateFiles(_asgi_app(f'[{{"path": "{secret}"}}]'.encode()), folders=[folder])
    status, headers = asyncio.run(_call(middleware, "/gradio_api/upload"))
    assert status == 200
    client_a = headers["set-cookie"].split(";")[0].split("=", 1)[1]
    assert "HttpOnly" in headers["set-cookie"] and "SameSite=Strict" in headers["set-cookie"]
    assert middleware.may_fetch(client_a, secret)
    client_b = "b" * 43
    assert asyncio.run(_call(middleware, f"/gradio_api/file={secret}", client_a))[0] == 200
    assert asyncio.run(_call(middleware, f"/gradio_api/file={secret}", client_b))[0] == 404
    assert asyncio.run(_call(middleware, f"/gradio_api/file={secret}"))[0] == 404
    assert asyncio.run(_call(middleware, f"/gradio_api/file={folder}/abc123/../abc123/patient.nii.gz",
                             client_b))[0] == 404
    assert asyncio.run(_call(middleware, "/gradio_api/file=/usr/share/static.css", client_b))[0] == 200
    # Bodies that are not JSON/HTML/event streams (a JavaScript bundle, an image) are not scanned.
    other = PrivateFiles(_asgi_app(f'"{secret}"'.encode(), b"application/javascript"), folders=[folder])
    asyncio.run(_call(other, "/assets/index.js", client_a))
    assert not other.may_fetch(client_a, secret)
    # The same file sent to a second browser (Gradio names files by content): both may fetch it.
    asyncio.run(_call(middleware, "/gradio_api/queue/data", client_b))
    assert middleware.may_fetch(client_a, secret) and middleware.may_fetch(client_b, secret)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on 127.0.0.1 with a 1 MB upload limit, a 2-request queue and 4 s temporary files."""
    tmp = tmp_path_factory.mktemp("server")
    temp_dir = tmp / "gradio-tmp"
    proc_log = tmp / "app.log"
    with running_app(proc_log, extra_env={"GRADIO_TEMP_DIR": str(temp_dir)},
                     extra_args=["--max-upload-mb", "1", "--queue-size", "2", "--cache-max-age-s", "4"]) as url:
        yield url, temp_dir


def _upload(client: httpx.Client, url: str, path: Path) -> httpx.Response:
    with open(path, "rb") as f:
        return client.post(url + "gradio_api/upload", files={"files": (path.name, f)}, timeout=60)


def test_second_browser_cannot_fetch_first_browsers_upload(server, shared_data):
    url, temp_dir = server
    ct = shared_data / "ct" / "lung1_image_small128.nii.gz"
    assert ct.stat().st_size < 1_000_000
    with httpx.Client() as first, httpx.Client() as second:
        first.get(url)
        second.get(url)
        answer = _upload(first, url, ct)
        assert answer.status_code == 200, answer.text
        stored = answer.json()[0]
        assert Path(stored).is_file() and str(temp_dir.resolve()) in stored
        assert first.get(url + "gradio_api/file=" + stored).content == ct.read_bytes()
        assert second.get(url + "gradio_api/file=" + stored).status_code == 404
        assert httpx.get(url + "gradio_api/file=" + stored).status_code == 404


def test_uploads_do_not_outlive_the_cache_limit(server, shared_data):
    url, _ = server
    with httpx.Client() as browser:
        browser.get(url)
        stored = Path(_upload(browser, url, shared_data / "ct" / "lung1_image_small128.nii.gz").json()[0])
        assert stored.is_file()
        deadline = time.monotonic() + 30  # age 4 s, swept every 2 s
        while stored.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not stored.exists(), "an upload outlived the server's cache limit"


def test_upload_over_the_limit_is_refused(server, tmp_path):
    url, _ = server
    big = tmp_path / "big.nii.gz"
    big.write_bytes(b"\0" * 1_500_000)
    with httpx.Client() as browser:
        browser.get(url)
        answer = _upload(browser, url, big)
    assert answer.status_code == 413 and "1048576 bytes" in answer.text, answer.text


# --------------------------------------------------------------------------------------------------- under load

def _peak_rss_mb(pid: int, stop: threading.Event, out: list) -> None:
    peak = 0
    while not stop.is_set():
        try:
            text = Path(f"/proc/{pid}/status").read_text()
            peak = max(peak, int(next(l for l in text.splitlines() if l.startswith("VmRSS")).split()[1]) // 1024)
        except (OSError, StopIteration):
            pass
        time.sleep(0.2)
    out.append(peak)


def _user(url: str, ct: Path, outcome: dict, key: int) -> None:
    """One person: search, open the first result, upload a CT. Each answer is a result or "busy" (or, after a
    search turned away, the app's "No result to open." sentence, recorded as "nothing to open")."""
    from gradio_client import Client, handle_file

    answers = []
    try:
        client = Client(url, verbose=False, download_files=False)
    except Exception as err:  # a refused connection is a failure of the test, not "busy"
        outcome[key] = [f"connect: {err}"]
        return
    for call in (lambda: client.predict("right pleural effusion", 5, api_name="/search"),
                 lambda: client.predict(api_name="/open_first_result"),
                 lambda: client.predict(handle_file(str(ct)), api_name="/read_ct_upload")):
        try:
            call()
            answers.append("answer")
        except Exception as err:
            text = str(err)
            if "queue is full" in text.lower() or "busy" in text.lower():
                answers.append("busy")
            elif answers and answers[0] == "busy" and text == "No result to open.":
                answers.append("nothing to open")   # the search was turned away, so the app has no result to open
            else:
                answers.append(f"error: {text}")
    outcome[key] = answers


def _eight_people(tmp_path: Path, ct: Path, extra_args: list[str]) -> tuple[list[str], int, float]:
    """8 people at once, 3 requests each, against a fresh server: (answers, server peak RSS in MB, seconds)."""
    with running_app(tmp_path / "app.log", extra_env={"GRADIO_TEMP_DIR": str(tmp_path / "gradio")},
                     extra_args=extra_args, with_process=True) as (url, proc):
        stop, peak = threading.Event(), []
        watcher = threading.Thread(target=_peak_rss_mb, args=(proc.pid, stop, peak))
        watcher.start()
        outcome: dict[int, list[str]] = {}
        users = [threading.Thread(target=_user, args=(url, ct, outcome, i)) for i in range(8)]
        started = time.monotonic()
        for u in users:
            u.start()
        for u in users:
            u.join(timeout=240)
        elapsed = time.monotonic() - started
        stop.set()
        watcher.join()
    answers = [a for i in range(8) for a in outcome.get(i, ["no answer"] * 3)]
    print(f"\n8 people x 3 requests {extra_args}: {answers.count('answer')} answered, {answers.count('busy')} busy, "
          f"{elapsed:.1f} s, server peak RSS {peak[0]} MB")
    return answers, peak[0], elapsed


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_eight_people_at_once_all_get_answers_and_memory_stays_bounded(tmp_path, shared_data):
    """The README's default limits (2 at a time, 16 waiting) serve eight people at once."""
    answers, peak_mb, _ = _eight_people(tmp_path, shared_data / "ct" / "lung1_image_small128.nii.gz", [])
    assert answers == ["answer"] * 24, answers
    assert peak_mb < 3000, f"server peak RSS {peak_mb} MB"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_full_queue_says_busy_and_serves_the_rest(tmp_path, shared_data):
    answers, peak_mb, _ = _eight_people(tmp_path, shared_data / "ct" / "lung1_image_small128.nii.gz",
                                        ["--queue-size", "1"])
    assert len(answers) == 24 and set(answers) <= {"answer", "busy", "nothing to open"}, answers
    assert answers.count("busy") >= 1 and answers.count("answer") >= 3, answers
    assert peak_mb < 3000, f"server peak RSS {peak_mb} MB"
