"""The CT CLIP in the app, in a real browser (headless Chromium via Playwright): Find CTs, heat map, zero-shot bars.

Starts `python app.py` on a free 127.0.0.1 port with the shipped checkpoint (assets/ctclip and the demo library's
latents) when it exists; otherwise with a small random-weight stand-in CT CLIP and latents for a subset of the demo
library, built in a temporary folder and passed through $CT_CTCLIP_DIR / $CT_LIBRARY_EMBEDDINGS. The test asserts
behaviour, never scores: an empty query gives one sentence; a report gives K results; a result opens with its report,
three planes with a coloured heat map (grey when the overlay is off) and 18 zero-shot bars; the Library and Open-a-CT
tabs show the bars too. Screenshots go to a temporary folder (CT_SCREENSHOTS=DIR keeps them).
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.browser import browser_page, running_app, screenshots_dir

ROOT = Path(__file__).resolve().parents[1]
STANDIN_STUDIES = 24  # demo studies encoded by the stand-in (enough for K = 10; a few seconds on a CPU)
QUERY = ("Findings: There is a moderate right pleural effusion with adjacent passive atelectasis. Centrilobular "
         "emphysematous changes are seen in both upper lobes. Impression: Right pleural effusion. Emphysema.")
K = 10

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]


def _checkpoint_env(scratch: Path) -> dict:
    """Environment for the app: nothing when the shipped checkpoint and its library latents exist, else a stand-in."""
    from engine.pipelines.ctclip import model_id
    from engine.settings import ctclip_dir, library_embeddings

    checkpoint = ctclip_dir()
    env = {}
    if not (checkpoint / "config.json").is_file():
        import torch

        from engine.models.ctclip import CTCLIP
        from tests.tiny_models import tiny_ctclip_config

        torch.manual_seed(0)
        cfg = tiny_ctclip_config()
        checkpoint = scratch / "ctclip"
        CTCLIP.build(cfg).save_pretrained(checkpoint)
        env["CT_CTCLIP_DIR"] = str(checkpoint)
    if _embeddings_model_id(library_embeddings()) != model_id(checkpoint):
        out = scratch / "ctclip_embeddings.safetensors"
        _write_subset_embeddings(checkpoint, out, STANDIN_STUDIES)
        env["CT_LIBRARY_EMBEDDINGS"] = str(out)
    return env


def _embeddings_model_id(path: Path) -> str | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        return (f.metadata() or {}).get("model_id")


def _write_subset_embeddings(checkpoint: Path, out: Path, n: int) -> None:
    """Latents of the first n demo studies, in the shipped file's format (ids + model id in the metadata)."""
    from engine.library import DemoLibrary
    from engine.pipelines.ctclip import CTClipPipeline
    from engine.study_library import build_demo_embeddings

    ids = [s.id for s in DemoLibrary.load().studies[:n]]
    build_demo_embeddings(CTClipPipeline.from_pretrained(checkpoint, "demo"), out, ids=ids)


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("find_app")
    env = dict(CT_WORKSTATION_LIBRARY=str(scratch / "user_library"), **_checkpoint_env(scratch))
    with running_app(scratch / "app.log", env) as url:
        yield url


@pytest.fixture(scope="module")
def page(app_url):
    with browser_page(app_url, timeout_ms=30_000) as page:
        yield page


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return screenshots_dir(tmp_path_factory)


# ----------------------------------------------------------------------------------------------------- helpers

PLANES = ("axial", "coronal", "sagittal")

# Pixels of an <img> whose channels differ by more than 40 (a grey CT has none; the heat map is coloured).
COLOUR_PIXELS_JS = """e => {
  const c = document.createElement('canvas'); c.width = e.naturalWidth; c.height = e.naturalHeight;
  const g = c.getContext('2d'); g.drawImage(e, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data; let n = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (Math.max(d[i], d[i+1], d[i+2]) - Math.min(d[i], d[i+1], d[i+2]) > 40) n++;
  }
  return n;
}"""


def _image(tab, plane: str):
    return tab.locator(f".block.ct-{plane} img")


def _colour_pixels(tab) -> dict[str, int]:
    return {plane: _image(tab, plane).first.evaluate(COLOUR_PIXELS_JS) for plane in PLANES}


def _wait_for_colour(tab, wanted, timeout_s: float = 30.0) -> dict[str, int]:
    """Poll the three planes until `wanted(colour pixel counts)` holds (the planes redraw a few times while a result
    opens: plain first, then with the heat map); return the counts."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            counts = _colour_pixels(tab)
        except Exception:  # an <img> replaced while it was read
            counts = None
        if counts is not None and wanted(counts):
            return counts
        if time.monotonic() > deadline:
            raise AssertionError(f"colour pixels per plane {counts} not as expected within {timeout_s} s")
        time.sleep(0.2)


def _toast_sentence(page) -> str:
    toast = page.locator(".toast-body").last
    toast.wait_for()
    message = toast.inner_text()
    assert "Traceback" not in message, message
    body = message.strip().splitlines()[-1].strip()
    assert len(re.findall(r"[.!?](?:\s|$)", body)) == 1 and body.endswith("."), message
    return body


def _bars(panel) -> list[str]:
    """The labels of the zero-shot chart's bars (one plotly bar per label)."""
    panel.locator(".js-plotly-plot .barlayer .point").first.wait_for()
    return [t.text_content() for t in panel.locator(".js-plotly-plot .ytick text").all()]  # SVG: no innerText


# ----------------------------------------------------------------------------------------------------- the test

def test_find_cts_heat_map_and_zero_shot_in_the_browser(page, shots, lung1_path):
    from engine.labels import LABELS

    page.get_by_role("tab", name="Find CTs").click()
    tab = page.locator("#tab-find")
    query = tab.locator(".find-query textarea")
    search = tab.get_by_role("button", name="Search")

    # An empty query: one sentence, no traceback.
    search.click()
    assert "empty" in _toast_sentence(page).lower()
    page.wait_for_timeout(500)
    page.screenshot(path=str(shots / "find_1_empty_query.png"), full_page=True)
    for close in page.locator(".toast-close").all():
        close.click()

    # A report (Enter submits): K results, ranked, each with an id, a score, labels and the report's first words.
    query.fill(QUERY)
    query.press("Enter")
    rows = tab.locator(".find-results .virtual-row")  # gradio 6 draws data rows as divs
    deadline = time.monotonic() + 60
    while rows.count() < K and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rows.count() == K
    table = [[c.inner_text().strip() for c in row.locator("[role=gridcell]").all()] for row in rows.all()]
    assert [int(r[0]) for r in table] == list(range(1, K + 1))
    scores = [float(r[2]) for r in table]
    assert scores == sorted(scores, reverse=True)
    assert all(r[1] and r[3] and r[5] in ("phantom", "file") for r in table), table

    # The first result opens by itself; then open the third: its report, three planes, the heat map, the bars.
    report = tab.locator(".block.find-report")
    report.get_by_text(table[0][1]).wait_for(timeout=60_000)
    note = tab.locator(".find-heat-note")
    note.get_by_text("Heat map of the query").wait_for(timeout=60_000)
    chosen = table[2][1]
    rows.nth(2).locator("[role=gridcell]").nth(1).click()
    report.get_by_text(chosen).wait_for()
    assert "Label vector" in report.inner_text() and "Impression" in report.inner_text()
    vector = re.search(r"Label vector.*?:\s*([01](?: [01]){17})", " ".join(report.inner_text().split()))
    assert vector, report.inner_text()
    # Its planes open; the slices jump to the strongest match, so the heat map shows in every plane.
    note.get_by_text("Heat map of the query").wait_for(timeout=60_000)
    assert chosen in tab.locator(".block.ct-info").inner_text()
    on = _wait_for_colour(tab, lambda counts: all(counts.values()))
    panel = tab.locator(".block.zeroshot-plot")
    assert sorted(_bars(panel)) == sorted(LABELS)
    assert panel.locator(".js-plotly-plot .barlayer .point").count() == len(LABELS)
    page.screenshot(path=str(shots / "find_2_result_heat.png"), full_page=True)

    # "Show where the query matches" off: the same planes in grey; on again: the colour is back.
    toggle = tab.locator(".find-show-heat input[type=checkbox]")
    toggle.uncheck()
    _wait_for_colour(tab, lambda counts: not any(counts.values()))
    page.screenshot(path=str(shots / "find_3_heat_off.png"), full_page=True)
    toggle.check()
    assert _wait_for_colour(tab, lambda counts: all(counts.values())) == on

    # Library: the open study's zero-shot bars, next to its own labels (bars coloured by them: a legend).
    page.get_by_role("tab", name="Library").click()
    lib_panel = page.locator("#tab-library .block.zeroshot-plot")
    assert sorted(_bars(lib_panel)) == sorted(LABELS)
    assert lib_panel.get_by_text("stated in the report").count() == 1
    page.screenshot(path=str(shots / "find_4_library_zero_shot.png"), full_page=True)

    # Open a CT: an uploaded real CT is read as soon as its planes are shown (no report, so no legend).
    page.get_by_role("tab", name="Open a CT").click()
    upload_tab = page.locator("#tab-open")
    upload_tab.locator(".block.ct-upload input[type=file]").set_input_files(str(lung1_path))
    open_panel = upload_tab.locator(".block.zeroshot-plot")
    assert sorted(_bars(open_panel)) == sorted(LABELS)
    # a real CT read by the phantom-trained demo model: the panel says the bars are not calibrated
    assert "not calibrated" in upload_tab.locator(".block.zeroshot-note").inner_text()
    page.screenshot(path=str(shots / "find_5_open_zero_shot.png"), full_page=True)
