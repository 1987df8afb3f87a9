"""Every bad input to the imaging I/O raises UserError with ONE sentence (no newline, ends with '.', no traceback):
CT files that are not CT in HU, damaged or hostile files (truncated, zip bombs, huge headers), wrong radiographs,
and recordings that are not audio or hold no sound."""
from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk
import soundfile
from PIL import Image

import engine.volume as volume_module
from engine.audio import read_audio
from engine.errors import UserError
from engine.radiograph import read_radiograph
from engine.volume import read_ct


def one_sentence(call, *args, **kwargs) -> str:
    with pytest.raises(UserError) as err:
        call(*args, **kwargs)
    message = str(err.value)
    assert message and message[0].isupper() and message.endswith("."), message
    assert "\n" not in message and "Traceback" not in message and "ERROR" not in message, message
    assert not re.search(r"[.!?]\s+[A-Z]", message), f"more than one sentence: {message}"
    return message


@pytest.fixture(scope="module")
def small_image(shared_data) -> sitk.Image:
    return sitk.ReadImage(str(shared_data / "ct" / "lung1_image_small128.nii.gz"))


def save_like(array: np.ndarray, reference: sitk.Image, path) -> str:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path))
    return str(path)


# ------------------------------------------------------------------------------------------------ not CT in HU

def test_eight_bit_windowed_volume(small_image, tmp_path):
    hu = sitk.GetArrayFromImage(small_image).astype(np.float32)
    windowed = np.clip((hu + 160) / 400 * 255, 0, 255).astype(np.uint8)     # a soft-tissue window export
    message = one_sentence(read_ct, save_like(windowed, small_image, tmp_path / "windowed.nii.gz"))
    assert "8-bit" in message


def test_mri_like_volume(small_image, tmp_path):
    hu = sitk.GetArrayFromImage(small_image).astype(np.float32)
    # T1-like contrast on the same anatomy: air dark, fat bright, muscle grey, cortical bone dark; arbitrary units
    mri = np.interp(hu, [-1024, -900, -100, 0, 60, 300, 3071], [0, 20, 600, 300, 350, 200, 50]).astype(np.float32)
    for scale in (1.0, 2.0, 6.0):
        message = one_sentence(read_ct, save_like(mri * scale, small_image, tmp_path / f"mri{scale:g}.nii.gz"))
        assert "Hounsfield" in message


def test_normalised_volume_is_not_hu(small_image, tmp_path):
    hu = sitk.GetArrayFromImage(small_image).astype(np.float32)
    one_sentence(read_ct, save_like(np.clip(hu, -1000, 1000) / 1000, small_image, tmp_path / "ctclip.nii.gz"))


def test_two_d_images_are_not_cts(shared_data, small_image, tmp_path):
    assert "2-D" in one_sentence(read_ct, shared_data / "cxr" / "00000001_000.png")
    assert "CR" in one_sentence(read_ct, shared_data / "cxr" / "siim_pa_chest.dcm")
    plane = sitk.GetArrayFromImage(small_image)[20]
    assert "2-D" in one_sentence(read_ct, save_like(plane, small_image[:, :, 20], tmp_path / "plane.nii.gz"))
    assert "2-D" in one_sentence(read_ct, save_like(plane[None], small_image[:, :, 20:21], tmp_path / "z1.nrrd"))


# ------------------------------------------------------------------------------------------ damaged and hostile

def test_missing_empty_and_non_image_files(tmp_path, shared_data):
    assert "does not exist" in one_sentence(read_ct, tmp_path / "nowhere.nii.gz")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    assert "empty" in one_sentence(read_ct, tmp_path / "empty.nii.gz")
    (tmp_path / "notes.nii.gz").write_text("not an image at all\n")
    one_sentence(read_ct, tmp_path / "notes.nii.gz")
    one_sentence(read_ct, shared_data / "README.md")
    (tmp_path / "no_dicom").mkdir()
    (tmp_path / "no_dicom" / "a.txt").write_text("hello")
    assert "No DICOM series" in one_sentence(read_ct, tmp_path / "no_dicom")


def test_truncated_nifti(shared_data, tmp_path):
    data = (shared_data / "ct" / "lung1_image_small128.nii.gz").read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    assert "truncated" in one_sentence(read_ct, tmp_path / "truncated.nii.gz")
    raw = tmp_path / "raw.nii"
    sitk.WriteImage(sitk.ReadImage(str(shared_data / "ct" / "lung1_image_small128.nii.gz")), str(raw))
    raw.write_bytes(raw.read_bytes()[:-1000])
    assert "truncated" in one_sentence(read_ct, raw)


def test_header_claiming_ten_gigabytes(tmp_path):
    # Headers only, the voxel data is missing: refused from the header, before anything is allocated.
    (tmp_path / "huge.mha").write_text("ObjectType = Image\nNDims = 3\nDimSize = 2048 2048 1300\n"
                                       "ElementType = MET_SHORT\nElementSpacing = 1 1 1\nElementDataFile = LOCAL\n")
    assert "million voxels" in one_sentence(read_ct, tmp_path / "huge.mha")
    (tmp_path / "huge.nrrd").write_bytes(b"NRRD0004\ntype: int16\ndimension: 3\nsizes: 2048 2048 1300\n"
                                         b"encoding: raw\nendian: little\n\n" + bytes(4096))
    assert "million voxels" in one_sentence(read_ct, tmp_path / "huge.nrrd")
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, 2048, 2048, 1300, 1, 1, 1, 1)
    struct.pack_into("<hh", header, 70, 4, 16)                  # int16
    struct.pack_into("<8f", header, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", header, 108, 352.0)
    header[344:348] = b"n+1\0"
    (tmp_path / "huge.nii").write_bytes(bytes(header))
    assert "million voxels" in one_sentence(read_ct, tmp_path / "huge.nii")


def test_zip_bomb_is_not_extracted(tmp_path):
    bomb = tmp_path / "bomb.zip"
    zeros = bytes(1 << 20)
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf, zf.open("slice.dcm", "w") as f:
        for _ in range(64):                                      # 64 MB of zeros -> about 64 kB
            f.write(zeros)
    assert bomb.stat().st_size < 1 << 20
    assert "zip bomb" in one_sentence(read_ct, bomb)


def test_zip_with_too_many_files_or_too_large(tmp_path, monkeypatch):
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(2001):
            zf.writestr(f"s/{i}.dcm", b"x")
    assert "2001 files" in one_sentence(read_ct, many)
    large = tmp_path / "large.zip"
    with zipfile.ZipFile(large, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", np.random.default_rng(0).bytes(3 << 20))   # incompressible 3 MB
    monkeypatch.setattr(volume_module, "MAX_ZIP_TOTAL_BYTES", 2 << 20)  # the 4 GB limit, scaled down
    assert "would unpack to" in one_sentence(read_ct, large)


def test_zip_member_paths_cannot_escape(tmp_path):
    archive = tmp_path / "inside" / "escape.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../../escaped.txt", b"written outside?")
        zf.writestr("/abs_escaped.txt", b"written outside?")
    assert "No DICOM series" in one_sentence(read_ct, archive)
    assert not list(tmp_path.rglob("escaped.txt")) and not (tmp_path / "abs_escaped.txt").exists()


def test_damaged_zip(tmp_path, shared_data):
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(shared_data / "ct" / "lidc_slice_0.dcm", "s/a.dcm")
    data = bytearray(archive.read_bytes())
    data[200:5000] = bytes(4800)                                 # corrupt the member, keep the directory
    archive.write_bytes(bytes(data))
    one_sentence(read_ct, archive)


# -------------------------------------------------------------------------------------------------- radiographs

def test_bad_radiographs(shared_data, tmp_path):
    assert "CT volume" in one_sentence(read_radiograph, shared_data / "ct" / "lung1_image.nii.gz")
    assert "CT image" in one_sentence(read_radiograph, shared_data / "ct" / "lidc_slice_0.dcm")
    assert "not an image" in one_sentence(read_radiograph, shared_data / "README.md")
    (tmp_path / "empty.png").write_bytes(b"")
    assert "empty" in one_sentence(read_radiograph, tmp_path / "empty.png")
    one_sentence(read_radiograph, tmp_path / "missing.png")
    data = (shared_data / "cxr" / "00000001_000.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 3])
    assert "damaged" in one_sentence(read_radiograph, tmp_path / "truncated.png")
    Image.fromarray(np.full((300, 300), 128, np.uint8)).save(tmp_path / "blank.png")
    assert "blank" in one_sentence(read_radiograph, tmp_path / "blank.png")
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp_path / "tiny.png")
    assert "too small" in one_sentence(read_radiograph, tmp_path / "tiny.png")


# ------------------------------------------------------------------------------------------------------- audio

def test_bad_audio(tmp_path, shared_data):
    assert "could not be decoded" in one_sentence(read_audio, shared_data / "README.md")
    one_sentence(read_audio, shared_data / "cxr" / "00000001_000.png")
    (tmp_path / "empty.wav").write_bytes(b"")
    assert "empty" in one_sentence(read_audio, tmp_path / "empty.wav")
    assert "empty" in one_sentence(read_audio, b"")
    one_sentence(read_audio, b"RIFF\x00\x00\x00\x00WAVEjunk")
    soundfile.write(str(tmp_path / "zero.wav"), np.zeros(0, np.int16), 16000)
    assert "too short" in one_sentence(read_audio, tmp_path / "zero.wav")
    soundfile.write(str(tmp_path / "silent.wav"), np.zeros(32000, np.int16), 16000)
    assert "silent" in one_sentence(read_audio, tmp_path / "silent.wav")
    hiss = (np.random.default_rng(0).normal(0, 10 ** (-70 / 20), 48000) * 32768).astype(np.int16)  # -70 dBFS
    soundfile.write(str(tmp_path / "hiss.wav"), hiss, 48000)
    assert "silent" in one_sentence(read_audio, tmp_path / "hiss.wav")
    assert "silent" in one_sentence(read_audio, (48000, np.zeros(48000, np.int16)))
    assert "empty" in one_sentence(read_audio, (48000, np.zeros(0, np.int16)))
    assert "sample rate" in one_sentence(read_audio, np.ones(100, np.float32))


@pytest.mark.skipif(not shutil.which("ffmpeg"), reason="ffmpeg makes the 0-second WebM")
def test_zero_second_webm(tmp_path):
    out = tmp_path / "zero.webm"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "anullsrc=r=48000:cl=mono", "-t", "0", "-c:a", "libopus", str(out)], check=True)
    one_sentence(read_audio, out)
