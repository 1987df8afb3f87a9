"""The public CLI contract on good input: one JSON object on stdout with the documented keys.

Bad and odd inputs (exit 2 with one sentence, warnings, no traceback, bounded memory) are in the one hostile-input
suite, tests/test_hostile_corpus.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from engine.labels import LABELS

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 120) -> tuple[int, dict, str]:
    proc = subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected exactly one JSON line, got {proc.stdout!r} (stderr {proc.stderr[-2000:]!r})"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(lines[0]), proc.stderr


def assert_one_sentence_error(code: int, payload: dict) -> None:
    assert code == 2, payload
    assert set(payload) == {"error"}, payload
    msg = payload["error"]
    assert msg and "\n" not in msg and msg.rstrip().endswith((".", "?")), msg
    assert "Traceback" not in msg and len(msg) < 600, msg


def test_info():
    code, out, _ = run_cli("info", "--json")
    assert code == 0
    assert out["labels"] == list(LABELS)
    assert out["conventions"]["orientation"] == "LPS"


def test_inspect_lung1(lung1_path):
    code, out, _ = run_cli("inspect", "--ct", str(lung1_path), "--json")
    assert code == 0, out
    assert out["shape"] == [512, 512, 48]
    assert out["spacing"][2] == pytest.approx(5.0)
    assert out["spacing"][0] == pytest.approx(0.5703, abs=1e-3)
    assert out["orientation"] == "LPS"
    assert out["is_hu"] is True and out["looks_like_chest_ct"] is True
    lo, hi = out["hu_range"]
    assert lo <= -1000 + 50 and hi > 500


def test_phantom_writes_volume_and_report(tmp_path):
    out_path = tmp_path / "p.nii.gz"
    code, out, _ = run_cli("phantom", "--labels", "Pleural effusion,Cardiomegaly", "--seed", "0",
                           "--out", str(out_path), "--json")
    assert code == 0, out
    assert out["path"] == str(out_path) and out_path.exists()
    assert [k for k, v in out["labels"].items() if v] == ["Cardiomegaly", "Pleural effusion"]
    assert set(out["labels"]) == set(LABELS)
    assert "Impression" in out["report"] and "effusion" in out["report"].lower()
    assert {f["label"] for f in out["findings"]} == {"Cardiomegaly", "Pleural effusion"}
    # The file reopens as a chest CT in HU with the demo geometry.
    code, info, _ = run_cli("inspect", "--ct", str(out_path), "--json")
    assert code == 0 and info["shape"] == out["shape"] and info["looks_like_chest_ct"] is True
    # Same seed and labels: the same volume, bit for bit.
    again = tmp_path / "q.nii.gz"
    run_cli("phantom", "--labels", "Pleural effusion,Cardiomegaly", "--seed", "0", "--out", str(again), "--json")
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(out_path)))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(again)))
    assert np.array_equal(a, b)


def test_phantom_normal_study(tmp_path):
    code, out, _ = run_cli("phantom", "--labels", "", "--seed", "3", "--out", str(tmp_path / "n.nii.gz"), "--json")
    assert code == 0, out
    assert sum(out["labels"].values()) == 0 and out["findings"] == []


# ------------------------------------------------------------------ CT CLIP verbs (the shipped demo checkpoint)

REPORT = ("Findings: Trachea and both main bronchi are open. Heart size is increased. There is a pleural effusion "
          "on the right, 25 mm thick, with compressive atelectasis. Centrilobular emphysema in both upper lobes. "
          "Impression: Cardiomegaly. Right pleural effusion. Emphysema.")


def test_retrieve_text_returns_k_studies(tmp_path):
    code, out, _ = run_cli("retrieve", "--text", REPORT, "--k", "7", "--library", str(tmp_path / "lib"), "--json")
    assert code == 0, out
    assert out["query"] == {"kind": "text", "seconds": None}
    results = out["results"]
    assert len(results) == 7
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    for r in results:
        assert set(r) >= {"id", "score", "labels", "report", "source"} and r["source"] == "phantom"
        assert set(r["labels"]) == set(LABELS) and r["report"].startswith("Findings:")
    assert out["elapsed_s"] > 0


def test_zeroshot_reads_all_18_labels(lung1_path):
    code, out, _ = run_cli("zeroshot", "--ct", str(lung1_path), "--json")
    assert code == 0, out
    assert list(out["findings"]) == list(LABELS)
    assert all(0.0 <= p <= 1.0 for p in out["findings"].values())
    # how far each bar can be trusted: the checkpoint's own held-out AUROCs (its metrics.json, read here directly)
    from engine.settings import ctclip_dir
    metrics = ctclip_dir() / "metrics.json"
    per_label = json.loads(metrics.read_text())["zero_shot"]["per_label"] if metrics.is_file() else {}
    assert out["held_out_auroc"] == {label: per_label[label]["auroc"] for label in LABELS if label in per_label}


def test_index_is_idempotent_and_indexed_ct_is_found(tmp_path, shared_data):
    ct = shared_data / "ct" / "lung1_image_small128.nii.gz"
    library = str(tmp_path / "lib")
    code, first, _ = run_cli("index", "--ct", str(ct), "--library", library, "--json")
    assert code == 0, first
    assert first["indexed"][0]["added"] is True and first["size"] == 1
    code, again, _ = run_cli("index", "--ct", str(ct), "--library", library, "--json")
    assert again["indexed"][0] == {**first["indexed"][0], "added": False} and again["size"] == 1
    code, out, _ = run_cli("retrieve", "--text", "lung mass", "--k", "400", "--library", library, "--json")
    assert code == 0 and any(r["id"] == first["indexed"][0]["id"] and r["source"] == "file" for r in out["results"])
