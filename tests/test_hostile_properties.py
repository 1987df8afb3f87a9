"""Hostile inputs in process: Hypothesis over header and spacing fields, and the rules behind the corpus's sentences
(memory cost of a read, streamed gzip completeness, the one rule for English queries, label lists, writing).

The CLI-level cases (exit status, one JSON sentence, no traceback, child memory) are in tests/test_hostile_corpus.py.
"""
from __future__ import annotations

import csv
import gzip
import re
import resource
import struct
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine.volume as volume_module
from engine.audio import read_audio
from engine.errors import UserError
from engine.labels import parse_label_list
from engine.query import check_query_text
from engine.volume import (MAX_READ_BYTES, SPACING_RANGE_MM, Volume, check_output_path, read_cost_bytes, read_ct,
                           write_nifti)
from tests.test_hostile_corpus import SMALL_CT, nifti_header

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def one_sentence(call, *args, **kwargs) -> str:
    with pytest.raises(UserError) as err:
        call(*args, **kwargs)
    message = str(err.value)
    assert message and message[0].isupper() and message.endswith("."), message
    assert "\n" not in message and not re.search(r"[.!?]\s+[A-Z]", message), message
    return message


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def assert_sane(volume: Volume) -> None:
    """What every Volume read_ct returns must satisfy, whatever the header said."""
    lo, hi = SPACING_RANGE_MM
    assert volume.array.dtype == np.float32 and volume.array.ndim == 3 and min(volume.array.shape[1:]) >= 16
    assert np.isfinite(volume.array).all()
    assert all(lo <= s <= hi for s in volume.spacing), volume.spacing
    assert volume.array.nbytes < MAX_READ_BYTES


# -------------------------------------------------------------------------------------------------- Hypothesis

NIFTI_TYPES = {2: 8, 4: 16, 8: 32, 16: 32, 64: 64, 128: 24, 256: 8, 512: 16, 768: 32, 0: 0, 9999: 16}
SPACINGS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                     st.sampled_from([0.0, -0.0, -2.0, 1e-3, 0.01, 0.7, 1.0, 5.0, 100.0, 100.5, 1e30]))


@PROPERTY_SETTINGS
@given(dims=st.lists(st.integers(-3, 32767), min_size=2, max_size=5), datatype=st.sampled_from(sorted(NIFTI_TYPES)),
       pixdim=st.tuples(SPACINGS, SPACINGS, SPACINGS), data_bytes=st.integers(0, 70_000),
       gzipped=st.booleans())
def test_any_nifti_header_gives_a_sane_volume_or_one_sentence(tmp_path_factory, dims, datatype, pixdim, data_bytes,
                                                              gzipped):
    header = nifti_header(dims, datatype=datatype, bitpix=NIFTI_TYPES[datatype], pixdim=pixdim)
    body = np.random.default_rng(len(dims) + data_bytes).integers(-1024, 1500, data_bytes // 2, dtype=np.int16)
    raw = bytes(header) + body.tobytes()
    path = tmp_path_factory.mktemp("nifti") / ("h.nii.gz" if gzipped else "h.nii")
    path.write_bytes(gzip.compress(raw, 1) if gzipped else raw)
    before = peak_rss_mb()
    try:
        volume = read_ct(path)
    except UserError as err:
        assert "\n" not in str(err) and str(err).endswith(".")
    else:
        assert_sane(volume)
    assert peak_rss_mb() - before < 500, "a header of a few bytes must not allocate hundreds of MB"


@PROPERTY_SETTINGS
@given(spacing=st.tuples(SPACINGS, SPACINGS, SPACINGS), fmt=st.sampled_from(["mha", "nrrd", "nii.gz"]))
def test_spacing_is_kept_exactly_or_refused_never_changed(tmp_path_factory, spacing, fmt):
    """A spacing in [0.01, 100] mm comes back as written; anything else (0, NaN, negative, absurd) is refused with
    a sentence about the spacing, never silently replaced (ITK would make 0 or NaN 1 mm, and drop signs)."""
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(SMALL_CT)))[:16]
    path = tmp_path_factory.mktemp("spacing") / f"s.{fmt}"
    image = sitk.GetImageFromArray(hu)
    sitk.WriteImage(image, str(path))
    text_spacing = " ".join(repr(float(s)) for s in spacing).encode()
    if fmt == "mha":
        data = path.read_bytes()
        path.write_bytes(re.sub(rb"ElementSpacing = [^\n]*", b"ElementSpacing = " + text_spacing, data, count=1))
    elif fmt == "nrrd":
        data = path.read_bytes()
        vectors = b"(%s,0,0) (0,%s,0) (0,0,%s)" % tuple(repr(float(s)).encode() for s in spacing)
        path.write_bytes(re.sub(rb"space directions: [^\n]*", b"space directions: " + vectors, data, count=1))
    else:
        data = bytearray(gzip.decompress(path.read_bytes()))
        struct.pack_into("<3f", data, 80, *spacing)
        struct.pack_into("<h", data, 252, 0)           # qform_code 0: pixdim is the geometry
        struct.pack_into("<h", data, 254, 0)           # sform_code 0
        path.write_bytes(gzip.compress(bytes(data), 1))
        spacing = tuple(float(np.float32(s)) for s in spacing)
    lo, hi = SPACING_RANGE_MM
    valid = all(np.isfinite(s) and lo <= s <= hi for s in spacing)
    if valid:
        volume = read_ct(path)
        assert volume.spacing == pytest.approx(spacing, rel=1e-6)
    else:
        assert "spacing" in one_sentence(read_ct, path)


# ------------------------------------------------------------------------------------------- memory before refusal

def test_read_cost_is_worked_out_from_the_header(tmp_path):
    # 800^3 int16 (issue 11): per voxel 2 x 2 bytes (ITK image + reoriented copy) + 4 (float32 HU) + 4 (a float32
    # temporary) + 2 (masks) = 14 bytes, 512,000,000 voxels -> 7,168,000,000 bytes, over the 3 GiB allowed.
    (tmp_path / "h.nii").write_bytes(bytes(nifti_header((800, 800, 800))))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(tmp_path / "h.nii"))
    reader.ReadImageInformation()
    assert read_cost_bytes(reader) == 7_168_000_000 > MAX_READ_BYTES
    # The real lung1 (512 x 512 x 48 int16) costs 14 x 12,582,912 = 176 MB: read.
    reader.SetFileName(str(SMALL_CT.parent / "lung1_image.nii.gz"))
    reader.ReadImageInformation()
    assert read_cost_bytes(reader) == 14 * 512 * 512 * 48


def test_multi_member_gzip_reads_the_same_voxels_and_forged_trailer_is_refused(tmp_path):
    payload = gzip.decompress(SMALL_CT.read_bytes())
    members = tmp_path / "members.nii.gz"
    members.write_bytes(b"".join(gzip.compress(payload[i:i + 100_000]) for i in range(0, len(payload), 100_000)))
    np.testing.assert_array_equal(read_ct(members).array, read_ct(SMALL_CT).array)
    raw = SMALL_CT.read_bytes()
    (tmp_path / "forged.nii.gz").write_bytes(raw[: len(raw) // 2] + raw[-8:])
    assert "truncated" in one_sentence(read_ct, tmp_path / "forged.nii.gz")
    # trailing zero padding after the last member (some tools pad to a block size) is not data: accepted
    (tmp_path / "padded.nii.gz").write_bytes(raw + bytes(512))
    np.testing.assert_array_equal(read_ct(tmp_path / "padded.nii.gz").array, read_ct(SMALL_CT).array)


@pytest.mark.parametrize("scale", [1.0, 6.0])
def test_mri_like_volumes_at_any_scale_are_not_hu(tmp_path, scale):
    image = sitk.ReadImage(str(SMALL_CT))
    hu = sitk.GetArrayFromImage(image)
    mri = np.interp(hu, [-1024, -900, -100, 0, 60, 300, 3071], [0, 20, 600, 300, 350, 200, 50]).astype(np.float32)
    out = sitk.GetImageFromArray(mri * scale)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(tmp_path / "mri.nii.gz"))
    assert "Hounsfield" in one_sentence(read_ct, tmp_path / "mri.nii.gz")


def test_zip_larger_than_allowed(tmp_path, monkeypatch):
    large = tmp_path / "large.zip"
    with zipfile.ZipFile(large, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", np.random.default_rng(0).bytes(3 << 20))   # incompressible 3 MB
    monkeypatch.setattr(volume_module, "MAX_ZIP_TOTAL_BYTES", 2 << 20)  # the 4 GB limit, scaled down
    assert "would unpack to" in one_sentence(read_ct, large)


# --------------------------------------------------------------------------------------------------------- writing

def test_unwritable_output_is_one_sentence_without_itk_text(tmp_path, capfd):
    volume = read_ct(SMALL_CT)
    assert "cannot be written" in one_sentence(write_nifti, volume, "/proc/out.nii.gz")
    assert "not a folder" in one_sentence(check_output_path, "/dev/null/out.nii.gz")
    (tmp_path / "d.nii.gz").mkdir()
    assert "is a folder" in one_sentence(check_output_path, tmp_path / "d.nii.gz")
    assert check_output_path(tmp_path / "new.nii.gz") == tmp_path / "new.nii.gz"
    assert not (tmp_path / "new.nii.gz").exists()        # the probe leaves nothing behind
    assert capfd.readouterr().err == ""


# ----------------------------------------------------------------------------------------------------- text, labels

def test_every_real_ctrate_report_is_english(shared_data):
    with open(shared_data / "ctrate_reports" / "reports_with_labels.csv", newline="", encoding="utf-8") as f:
        reports = [row["findings"] + " " + row["impression"] for row in csv.DictReader(f)]
    assert len(reports) == 800
    for report in reports:
        check_query_text(report[:20_000])


@pytest.mark.parametrize("text", [
    "Cardiomegaly. Right pleural effusion. Emphysema.", "lung mass", "bronchiolitis obliterans organizing pneumonia",
    "Findings consistent with Löfgren syndrome and hilar adenopathy.", "No acute cardiopulmonary abnormality.",
    "Patchy bibasilar atelectasis, likely dependent."])
def test_english_queries_pass(text):
    assert check_query_text(text) == text


@pytest.mark.parametrize("text", [
    "Befund: Lungenemphysem beidseits, Kardiomegalie, kleiner Pleuraerguss rechts.",      # German
    "Kein Pleuraerguss. Herz normal groß. Lunge beidseits belüftet.",                     # German, one shared word
    "Epanchement pleural droit de faible abondance avec atélectasie.",                    # French
    "Derrame pleural derecho y enfisema centrolobulillar bilateral.",                     # Spanish
    "右側胸水と肺気腫",  # Japanese
    "Правосторонний плевральный выпот и эмфизема."])  # Russian
def test_other_languages_are_refused_by_one_rule(text):
    assert "does not look like English" in one_sentence(check_query_text, text)


def test_text_limits_and_undecodable_bytes():
    assert "empty" in one_sentence(check_query_text, "   \t ")
    assert "characters long" in one_sentence(check_query_text, "effusion " * 13_000)
    assert "UTF-8" in one_sentence(check_query_text, "right pleural \udcff effusion")


def test_label_lists():
    assert parse_label_list("") == [] and parse_label_list("  ") == []
    assert parse_label_list("pleural effusion, Cardiomegaly,") == ["Cardiomegaly", "Pleural effusion"]
    for typed in (",,,", " , ,"):
        with pytest.raises(ValueError, match="names no label"):
            parse_label_list(typed)


# ----------------------------------------------------------------------------------------------------------- audio

def test_microphone_arrays_and_uploads():
    assert "silent" in one_sentence(read_audio, (48000, np.zeros(48000, np.int16)))
    assert "empty" in one_sentence(read_audio, (48000, np.zeros(0, np.int16)))
    assert "sample rate" in one_sentence(read_audio, np.ones(100, np.float32))
    assert "1 Hz" in one_sentence(read_audio, (1, np.ones(10, np.float32)))
    noisy = np.sin(np.arange(16000) / 5).astype(np.float32)
    noisy[100] = np.nan
    assert "not numbers" in one_sentence(read_audio, (16000, noisy))
    assert "empty" in one_sentence(read_audio, b"")
