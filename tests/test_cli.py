"""The public CLI contract: one JSON object on stdout, exit 2 + {"error": one sentence} on bad input, no traceback."""
from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
import zipfile
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


def _bad_ct_files(tmp: Path, shared: Path) -> dict[str, Path]:
    files = {}
    files["empty"] = tmp / "empty.nii.gz"
    files["empty"].write_bytes(b"")
    raw = (shared / "ct" / "lung1_image_small128.nii.gz").read_bytes()
    files["truncated"] = tmp / "truncated.nii.gz"
    files["truncated"].write_bytes(raw[: len(raw) // 3])
    files["png"] = shared / "cxr" / "00000001_000.png"
    eight_bit = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 256, (40, 64, 64)).astype(np.uint8))
    files["8bit"] = tmp / "eight_bit.nii.gz"
    sitk.WriteImage(eight_bit, str(files["8bit"]))
    yy, xx = np.mgrid[:64, :64]
    mri = np.where((yy - 32) ** 2 + (xx - 32) ** 2 < 28 ** 2, 300.0, 0.0)[None].repeat(30, 0)
    mri = mri + np.random.default_rng(1).normal(0, 20, mri.shape) + 600 * ((yy - 32) ** 2 + (xx - 20) ** 2 < 64)
    files["mri"] = tmp / "mri.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(mri.astype(np.float32)), str(files["mri"]))
    # A NIfTI-1 header that claims 4000 x 4000 x 700 int16 voxels (about 22 GB) with hardly any data behind it.
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)                                # sizeof_hdr
    struct.pack_into("<8h", hdr, 40, 3, 4000, 4000, 700, 1, 1, 1, 1)  # dim
    struct.pack_into("<hh", hdr, 70, 4, 16)                            # datatype int16, bitpix
    struct.pack_into("<4f", hdr, 76, 1, 1, 1, 1)                       # pixdim
    struct.pack_into("<f", hdr, 108, 352)                              # vox_offset
    hdr[344:348] = b"n+1\0"
    raw_hdr = hdr
    files["huge_header"] = tmp / "huge.nii.gz"
    files["huge_header"].write_bytes(gzip.compress(bytes(raw_hdr) + b"\0" * 4 + b"\0" * 1024))
    # A zip bomb: one member that inflates to 5 GB of zeros (written in streamed chunks, a few MB on disk).
    files["zip_bomb"] = tmp / "bomb.zip"
    with zipfile.ZipFile(files["zip_bomb"], "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("slice0001.dcm", "w", force_zip64=True) as member:
            chunk = b"\0" * (64 << 20)
            for _ in range(80):
                member.write(chunk)
    files["not_an_image"] = tmp / "notes.nii.gz"
    files["not_an_image"].write_text("this is a text file, not a CT")
    files["missing"] = tmp / "does_not_exist.nii.gz"
    return files


@pytest.mark.slow
def test_bad_ct_inputs_give_one_sentence_and_status_2(tmp_path, shared_data):
    for name, path in _bad_ct_files(tmp_path, shared_data).items():
        code, out, _ = run_cli("inspect", "--ct", str(path), "--json")
        assert_one_sentence_error(code, out)


def test_bad_arguments(tmp_path):
    assert_one_sentence_error(*run_cli("inspect", "--json")[:2])
    assert_one_sentence_error(*run_cli("phantom", "--labels", "Pneumothorax", "--out",
                                       str(tmp_path / "x.nii.gz"), "--json")[:2])
    assert_one_sentence_error(*run_cli("phantom", "--labels", "Emphysema", "--out", str(tmp_path / "x.png"),
                                       "--json")[:2])
    assert_one_sentence_error(*run_cli("nonsense-verb", "--json")[:2])


def test_plain_output_errors_go_to_stderr(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "engine", "inspect", "--ct", str(tmp_path / "nope.nii")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_mixed_dicom_series_folder_is_refused(tmp_path, shared_data):
    from tests.test_io_ct import write_dicom_series

    image = sitk.ReadImage(str(shared_data / "ct" / "lung1_image_small128.nii.gz"))
    write_dicom_series(image[:, :, :3], tmp_path / "mixed" / "a", "1.2.826.0.1.3680043.2.1125.7.1")
    write_dicom_series(image[:, :, 3:6], tmp_path / "mixed" / "b", "1.2.826.0.1.3680043.2.1125.7.2")
    code, out, _ = run_cli("inspect", "--ct", str(tmp_path / "mixed"), "--json")
    assert_one_sentence_error(code, out)
    assert "2 DICOM series" in out["error"]


def test_bad_audio_and_radiograph_inputs(tmp_path, shared_data):
    import soundfile

    silent = tmp_path / "silent.wav"
    soundfile.write(silent, np.zeros(16000 * 3, dtype=np.float32), 16000)
    empty_wav = tmp_path / "zero.wav"
    soundfile.write(empty_wav, np.zeros(0, dtype=np.float32), 16000)
    text = tmp_path / "notes.ogg"
    text.write_text("not a recording")
    for path in (silent, empty_wav, text, shared_data / "cxr" / "00000001_000.png"):
        assert_one_sentence_error(*run_cli("inspect", "--audio", str(path), "--json")[:2])
    assert_one_sentence_error(*run_cli("inspect", "--cxr", str(shared_data / "ct" / "lung1_image.nii.gz"),
                                       "--json")[:2])
    spoken = tmp_path / "spoken.wav"
    subprocess.run(["espeak-ng", "-w", str(spoken), "Small right pleural effusion."], check=True)
    code, out, _ = run_cli("inspect", "--audio", str(spoken), "--json")
    assert code == 0 and out["sample_rate"] == 16000 and 0.5 < out["seconds"] < 5


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


def test_ct_clip_verbs_reject_bad_input(tmp_path, shared_data):
    for text in ("", "   ", "effusion " * 13_000, "右側胸水と肺気腫"):
        assert_one_sentence_error(*run_cli("retrieve", "--text", text, "--json")[:2])
    assert_one_sentence_error(*run_cli("retrieve", "--text", "emphysema", "--k", "0", "--json")[:2])
    assert_one_sentence_error(*run_cli("zeroshot", "--ct", str(shared_data / "cxr" / "00000001_000.png"),
                                       "--json")[:2])
    assert_one_sentence_error(*run_cli("zeroshot", "--ct", str(tmp_path / "missing.nii.gz"), "--json")[:2])
    assert_one_sentence_error(*run_cli("retrieve", "--text", "emphysema", "--preset", "paper", "--json")[:2])
    assert_one_sentence_error(*run_cli("index", "--ct", str(tmp_path / "nothing"), "--library",
                                       str(tmp_path / "lib"), "--json")[:2])
