"""Acceptance (issue 13): dictating in the Dictate tab of a real browser.

Headless Chromium (Debian's, through Playwright) gets a fake microphone that plays a synthesised dictation
(espeak-ng -s 140, a WAV; `--use-fake-ui-for-media-stream --use-fake-device-for-media-stream
--use-file-for-fake-audio-capture=FILE`). The test records in the Dictate tab and checks that the ranking appears
and is renewed WHILE recording (streaming: the status names the seconds heard so far; the top K rows are there
before Stop is pressed), that a final ranking follows Stop, that the 18 findings read from the speech are drawn, and
that the top K studies carry the dictated findings more than a random K of the library does (labels of the result
ids looked up in the demo library: a comparison with chance, not a threshold tuned to one checkpoint).

Needs the TRAINED speech encoder (settings.speech_dir(), assets/speech): skips with one line while none is shipped.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import soundfile

from tests.browser import browser_page, running_app, screenshots_dir
from tests.trained_speech import chance_shared_labels, espeak_wav, shared_labels, trained_speech_dir

DICTATION = ("Findings: There is a large right pleural effusion with compressive atelectasis of the right lower "
             "lobe. The heart is enlarged. There is a small pericardial effusion. "
             "Impression: Right pleural effusion with atelectasis. Cardiomegaly. Pericardial effusion.")
DICTATED_LABELS = {"Pleural effusion", "Atelectasis", "Cardiomegaly", "Pericardial effusion"}
K = 10
FAKE_MICROPHONE = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
SECONDS_RE = re.compile(r"Ranking while you speak: ([0-9.]+) s")

pytestmark = [pytest.mark.browser, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def speech_folder():
    return trained_speech_dir()


@pytest.fixture(scope="module")
def dictation_wav(tmp_path_factory, speech_folder) -> Path:
    return espeak_wav(DICTATION, tmp_path_factory.mktemp("microphone") / "dictation.wav")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, speech_folder):
    scratch = tmp_path_factory.mktemp("dictate_app")
    env = {"CT_WORKSTATION_LIBRARY": str(scratch / "user_library"), "CT_SPEECH_DIR": str(speech_folder)}
    with running_app(scratch / "app.log", env, start_timeout_s=600) as url:
        yield url


def _result_ids(tab) -> list[str]:
    rows = tab.locator("#dictate-results .virtual-row")
    return [row.locator("[role=gridcell]").nth(1).inner_text().strip() for row in rows.all()]


def _wait(predicate, timeout_s: float, what: str, poll_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s:.0f} s")
        time.sleep(poll_s)


def test_dictating_in_the_browser_ranks_while_speaking(app_url, dictation_wav, tmp_path_factory):
    from engine.labels import LABELS
    from engine.library import DemoLibrary

    shots = screenshots_dir(tmp_path_factory)
    microphone = FAKE_MICROPHONE + [f"--use-file-for-fake-audio-capture={dictation_wav}"]
    with browser_page(app_url, timeout_ms=60_000, extra_args=microphone) as page:
        page.get_by_role("tab", name="Dictate").click()
        tab = page.locator("#tab-dictate")
        status = tab.locator("#dictate-status")
        status.get_by_text("Press the microphone").wait_for()     # the model loaded: no "⚠ ..." sentence

        # What the page sent, for the failure message: this test has failed in full-suite runs with no ranking at
        # all after 150 s (3 of 7 runs, 2026-12-01/02; never when run alone, 8 of 8): it says which stage stopped.
        sent = {"stream chunks": 0, "queue joins": 0}

        def count(request):
            for key, part in (("stream chunks", "/gradio_api/stream/"), ("queue joins", "/gradio_api/queue/join")):
                sent[key] += part in request.url
        page.on("request", count)
        tab.locator("#dictate-audio .record-button").click()
        tab.locator("#dictate-audio .stop-button").wait_for(timeout=30_000)   # the browser is recording
        # While recording: a ranking after the first 3 s of speech, then renewed (the seconds heard grow).
        heard = []

        def renewed():
            match = SECONDS_RE.search(status.inner_text())
            if match and (not heard or float(match.group(1)) > heard[-1]):
                heard.append(float(match.group(1)))
            return len(heard) >= 2 and len(_result_ids(tab)) == K
        try:
            _wait(renewed, 150, "two rankings while recording")
        except AssertionError as err:
            page.screenshot(path=str(shots / "dictate_0_no_ranking.png"), full_page=True)
            raise AssertionError(f"{err}; the page sent {sent}; status {status.inner_text()!r}; "
                                 f"seconds heard {heard}; screenshot {shots / 'dictate_0_no_ranking.png'}") from None
        during = _result_ids(tab)
        assert len(during) == K and len(set(during)) == K, during
        page.screenshot(path=str(shots / "dictate_1_while_speaking.png"), full_page=True)
        # Chromium's fake microphone plays the file in a loop from wherever it was when recording began: keep
        # recording until the whole dictation has been heard once (in some rotation), as a radiologist would finish
        length_s = soundfile.info(str(dictation_wav)).duration
        _wait(lambda: renewed() and heard[-1] >= length_s + 1.0, 150, "the whole dictation heard")

        tab.locator("#dictate-audio .stop-button").click()
        # a hang guard, not a timing: idle it takes seconds; on a CPU shared with a training run it once took > 90 s
        _wait(lambda: "Final ranking" in status.inner_text(), 240, "the final ranking after Stop")
        final = _wait(lambda: (ids := _result_ids(tab)) and len(ids) == K and ids, 30, "the final table")
        seconds = float(re.search(r"([0-9.]+) s of dictation", status.inner_text()).group(1))
        assert seconds >= heard[-1], (heard, status.inner_text())
        findings = tab.locator("#dictate-findings .js-plotly-plot")
        findings.locator(".barlayer .point").first.wait_for()
        bars = [t.text_content() for t in findings.locator(".ytick text").all()]   # SVG text: no innerText
        assert sorted(bars) == sorted(LABELS)
        page.screenshot(path=str(shots / "dictate_2_final.png"), full_page=True)

    library = DemoLibrary.load()
    top = shared_labels(DICTATED_LABELS, [set(library.get(i).labels) for i in final]).mean()
    chance = chance_shared_labels(DICTATED_LABELS, [set(s.labels) for s in library.studies])
    assert top > chance, f"the top {K} carry {top:.2f} of the dictated findings, a random {K} {chance:.2f}"
