"""The hostile-input corpus (issue 11): bad or odd inputs through the public CLI, each in its own subprocess.

Every case runs `python -m engine VERB ... --json` and asserts the contract of docs/architecture.md:
- exit status 2 with exactly one JSON object {"error": "<one sentence>"} for bad input, or 0 for an odd but valid
  input, with the expected warning in the answer's "warnings";
- no traceback and no raw library text (ITK, Pillow, FFmpeg) on stderr;
- a bounded peak memory of the child process (its own ru_maxrss from os.wait4, see WRAPPER), and for the
  decompression bomb a bounded CPU time (user + system, which other processes on the machine do not inflate, unlike wall time).

The files are generated small in a temporary folder (real data from ../shared/data where a real file matters);
the cases run two at a time. One hostile-file suite: the former tests/test_bad_inputs_io.py and the bad-input
cases of tests/test_cli.py live here.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import soundfile
from PIL import Image

from tests.conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
MAX_CHILD_RSS_MB = 1500          # every case: the child's peak resident memory
SMALL_CT = SHARED_DATA / "ct" / "lung1_image_small128.nii.gz"
CXR_PNG = SHARED_DATA / "cxr" / "00000001_000.png"
CXR_DCM = SHARED_DATA / "cxr" / "siim_pa_chest.dcm"
CT_SLICE = SHARED_DATA / "ct" / "lidc_slice_0.dcm"


@dataclass
class Case:
    """One CLI call: argv after `python -m engine` (built from the case's files), the exit status it must give and
    a text (regex, case-insensitive) the error sentence (status 2) or one of the warnings (status 0) must contain."""
    id: str
    build: object                         # (folder: Path) -> list of argv items (str or bytes)
    status: int
    expect: str = ""
    max_rss_mb: float = MAX_CHILD_RSS_MB
    max_cpu_s: float | None = None
    check: object = None                  # optional (payload, folder) -> None for case-specific assertions


CASES: list[Case] = []


def case(id_, status, expect="", **kw):
    def register(build):
        CASES.append(Case(id_, build, status, expect, **kw))
        return build
    return register


def ct(path) -> list:
    return ["inspect", "--ct", str(path), "--json"]


def cxr(path) -> list:
    return ["inspect", "--cxr", str(path), "--json"]


def audio(path) -> list:
    return ["inspect", "--audio", str(path), "--json"]


# ------------------------------------------------------------------------------------------------- file makers

def small_hu() -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(str(SMALL_CT))
    return sitk.GetArrayFromImage(image), image


def save(array: np.ndarray, path: Path, like: sitk.Image | None = None, spacing=None, vector=False) -> Path:
    image = sitk.GetImageFromArray(array, isVector=vector)
    if like is not None:
        image.CopyInformation(like)
    if spacing is not None:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def nifti_header(dims, datatype=4, bitpix=16, pixdim=(1.0, 1.0, 1.0)) -> bytearray:
    """A NIfTI-1 header (348 bytes + 4 extension bytes) declaring `dims` (x, y, z[, t]) voxels."""
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    struct.pack_into("<hh", header, 70, datatype, bitpix)
    struct.pack_into("<8f", header, 76, 1.0, *pixdim, *([1.0] * (7 - len(pixdim))))
    struct.pack_into("<f", header, 108, 352.0)
    struct.pack_into("<f", header, 112, 1.0)        # scl_slope
    header[344:348] = b"n+1\0"
    return header


def with_pixdim(path: Path, out: Path, pixdim_z: float) -> Path:
    """A copy of an uncompressed-then-gzipped NIfTI with pixdim[3] (the z spacing) set to `pixdim_z`."""
    data = bytearray(gzip.decompress(path.read_bytes()))
    struct.pack_into("<f", data, 88, pixdim_z)
    out.write_bytes(gzip.compress(bytes(data)))
    return out


def tone(seconds: float, rate: int, amplitude: float = 0.3, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = amplitude * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t)) / 1.5
    return np.stack([mono] * channels, axis=1) if channels > 1 else mono


# =========================================================================================================== CT

@case("ct-missing", 2, "does not exist")
def _(d): return ct(d / "does_not_exist.nii.gz")


@case("ct-empty-file", 2, "empty")
def _(d):
    (d / "empty.nii.gz").write_bytes(b"")
    return ct(d / "empty.nii.gz")


@case("ct-folder-without-dicom", 2, "No DICOM series")
def _(d):
    (d / "no_dicom").mkdir()
    (d / "no_dicom" / "a.txt").write_text("hello")
    return ct(d / "no_dicom")


@case("ct-symlink-loop", 2, "link")
def _(d):
    os.symlink(d / "loop_b.nii.gz", d / "loop_a.nii.gz")
    os.symlink(d / "loop_a.nii.gz", d / "loop_b.nii.gz")
    return ct(d / "loop_a.nii.gz")


@case("ct-broken-symlink", 2, "link")
def _(d):
    os.symlink(d / "nowhere.nii.gz", d / "broken.nii.gz")
    return ct(d / "broken.nii.gz")


@case("ct-text-named-nii-gz", 2, "not a readable|NIfTI")
def _(d):
    (d / "notes.nii.gz").write_text("this is a text file, not a CT")
    return ct(d / "notes.nii.gz")


@case("ct-markdown-file", 2, "not a readable")
def _(d): return ct(SHARED_DATA / "README.md")


@case("ct-png-picture", 2, "2-D")
def _(d): return ct(CXR_PNG)


@case("ct-pdf-renamed-nii", 2, "not a readable")
def _(d):
    (d / "report.nii").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer\n%%EOF\n")
    return ct(d / "report.nii")


@case("ct-truncated-gz", 2, "truncated")
def _(d):
    raw = SMALL_CT.read_bytes()
    (d / "truncated.nii.gz").write_bytes(raw[: len(raw) // 3])
    return ct(d / "truncated.nii.gz")


@case("ct-truncated-raw-nii", 2, "truncated")
def _(d):
    sitk.WriteImage(sitk.ReadImage(str(SMALL_CT)), str(d / "raw.nii"))
    (d / "raw.nii").write_bytes((d / "raw.nii").read_bytes()[:-1000])
    return ct(d / "raw.nii")


@case("ct-truncated-gz-with-forged-size-trailer", 2, "truncated")
def _(d):
    # Half of the deflate stream, then the 8-byte trailer of the complete file (CRC32 and ISIZE): a trailer check
    # alone would accept it and ITK would fill the missing half with a constant.
    raw = SMALL_CT.read_bytes()
    (d / "forged.nii.gz").write_bytes(raw[: len(raw) // 2] + raw[-8:])
    return ct(d / "forged.nii.gz")


@case("ct-multi-member-gzip", 0, check=lambda out, d: out["shape"] == [128, 128, 48] or pytest.fail(str(out)))
def _(d):
    # Two gzip members (as `cat a.gz b.gz` or bgzip write): one valid stream of the whole file, whose last
    # member's size trailer says only the size of that member.
    payload = gzip.decompress(SMALL_CT.read_bytes())
    cut = len(payload) // 2
    (d / "members.nii.gz").write_bytes(gzip.compress(payload[:cut]) + gzip.compress(payload[cut:]))
    return ct(d / "members.nii.gz")


@case("ct-header-claims-22-GB", 2, "GB of memory")
def _(d):
    header = nifti_header((4000, 4000, 700))
    (d / "huge.nii.gz").write_bytes(gzip.compress(bytes(header) + bytes(1024)))
    return ct(d / "huge.nii.gz")


@case("ct-nifti-unknown-datatype", 2, "not a readable")
def _(d):
    (d / "datatype.nii").write_bytes(bytes(nifti_header((64, 64, 8), datatype=9999)) + bytes(64 * 64 * 8 * 2))
    return ct(d / "datatype.nii")


@case("ct-raw-nii-header-claims-10-GB", 2, "GB of memory")
def _(d):
    (d / "huge.nii").write_bytes(bytes(nifti_header((2048, 2048, 1300))))
    return ct(d / "huge.nii")


@case("ct-mha-header-claims-10-GB", 2, "GB of memory")
def _(d):
    (d / "huge.mha").write_text("ObjectType = Image\nNDims = 3\nDimSize = 2048 2048 1300\n"
                                "ElementType = MET_SHORT\nElementSpacing = 1 1 1\nElementDataFile = LOCAL\n")
    return ct(d / "huge.mha")


@case("ct-nrrd-header-claims-10-GB", 2, "GB of memory")
def _(d):
    (d / "huge.nrrd").write_bytes(b"NRRD0004\ntype: int16\ndimension: 3\nsizes: 2048 2048 1300\n"
                                  b"encoding: raw\nendian: little\n\n" + bytes(4096))
    return ct(d / "huge.nrrd")


@case("ct-gzip-bomb-800-cubed-all-air", 2, "GB of memory", max_rss_mb=1000, max_cpu_s=2.0)
def _(d):
    # Issue 11 defect 2: a few MB on disk that decode to 800^3 int16 voxels, all -1024 HU (1 GB of voxels, several
    # GB once converted): refused from the header, before any voxel is allocated.
    path = d / "bomb.nii.gz"
    packer = zlib.compressobj(6, zlib.DEFLATED, 31)
    slab = np.full((16, 800, 800), -1024, np.int16).tobytes()
    with open(path, "wb") as f:
        f.write(packer.compress(bytes(nifti_header((800, 800, 800)))))
        for _ in range(800 // 16):
            f.write(packer.compress(slab))
        f.write(packer.flush())
    assert path.stat().st_size < 8e6
    return ct(path)


@case("ct-all-air-volume", 2, "only air")
def _(d): return ct(save(np.full((40, 64, 64), -1024, np.int16), d / "air.nii.gz"))


@case("ct-all-nan-volume", 2, "NaN or infinite")
def _(d): return ct(save(np.full((20, 32, 32), np.nan, np.float32), d / "nan.nii.gz"))


@case("ct-all-inf-volume", 2, "NaN or infinite")
def _(d): return ct(save(np.full((20, 32, 32), np.inf, np.float32), d / "inf.nii.gz"))


@case("ct-constant-zero-volume", 2, "same value")
def _(d): return ct(save(np.zeros((20, 32, 32), np.int16), d / "zeros.nii.gz"))


@case("ct-some-nan-voxels", 0, "not numbers")
def _(d):
    hu, image = small_hu()
    hu = hu.astype(np.float32)
    hu[10:12, 40:60, 40:60] = np.nan
    return ct(save(hu, d / "some_nan.nii.gz", like=image))


@case("ct-1x1x1-volume", 2, "too small")
def _(d): return ct(save(np.full((1, 1, 1), -1000, np.int16), d / "one.nii.gz"))


@case("ct-zero-length-dimension", 2, "holds no image")
def _(d):
    (d / "zero_dim.nii").write_bytes(bytes(nifti_header((64, 64, 0))))
    return ct(d / "zero_dim.nii")


@case("ct-negative-dimension", 2, "no image|too small|not a readable")
def _(d):
    (d / "negative_dim.nii").write_bytes(bytes(nifti_header((64, -64, 10))) + bytes(64 * 64 * 20))
    return ct(d / "negative_dim.nii")


@case("ct-2d-nifti", 2, "2-D")
def _(d):
    hu, image = small_hu()
    return ct(save(hu[20], d / "plane.nii.gz", like=image[:, :, 20]))


@case("ct-single-slice-nrrd", 2, "2-D")
def _(d):
    hu, image = small_hu()
    return ct(save(hu[20:21], d / "z1.nrrd", like=image[:, :, 20:21]))


@case("ct-4d-volume", 2, "single-channel 3-D")
def _(d):
    hu, _ = small_hu()
    return ct(save(np.stack([hu[:8]] * 2), d / "four_d.nii.gz"))


@case("ct-rgb-nifti", 2, "single-channel 3-D")
def _(d):
    hu, _ = small_hu()
    return ct(save(np.stack([hu[:8]] * 3, axis=-1), d / "rgb.nii.gz", vector=True))


@case("ct-8bit-windowed", 2, "8-bit")
def _(d):
    hu, image = small_hu()
    windowed = np.clip((hu.astype(np.float32) + 160) / 400 * 255, 0, 255).astype(np.uint8)
    return ct(save(windowed, d / "windowed.nii.gz", like=image))


@case("ct-mri-like", 2, "Hounsfield")
def _(d):
    hu, image = small_hu()
    mri = np.interp(hu, [-1024, -900, -100, 0, 60, 300, 3071], [0, 20, 600, 300, 350, 200, 50]).astype(np.float32)
    return ct(save(mri * 2, d / "mri.nii.gz", like=image))


@case("ct-normalised-volume", 2, "Hounsfield")
def _(d):
    hu, image = small_hu()
    return ct(save(np.clip(hu, -1000, 1000).astype(np.float32) / 1000, d / "normalised.nii.gz", like=image))


@case("ct-spacing-zero", 2, "spacing")
def _(d): return ct(with_pixdim(SMALL_CT, d / "spacing0.nii.gz", 0.0))


@case("ct-spacing-nan", 2, "spacing")
def _(d): return ct(with_pixdim(SMALL_CT, d / "spacing_nan.nii.gz", float("nan")))


@case("ct-spacing-negative", 2, "spacing")
def _(d): return ct(with_pixdim(SMALL_CT, d / "spacing_neg.nii.gz", -2.0))


@case("ct-spacing-1e30", 2, "spacing")
def _(d): return ct(with_pixdim(SMALL_CT, d / "spacing_huge.nii.gz", 1e30))


@case("ct-spacing-one-micrometre", 2, "spacing")
def _(d):
    hu, _ = small_hu()
    return ct(save(hu, d / "tiny_spacing.mha", spacing=(0.001, 0.001, 0.001)))


@case("ct-nrrd-spacing-zero", 2, "spacing")
def _(d):
    hu, image = small_hu()
    path = save(hu, d / "s0.nrrd", like=image)
    data = path.read_bytes()
    head, sep, body = data.partition(b"\n\n")
    head = re.sub(rb"space directions: .*", b"space directions: (0,0,0) (0,2.28125,0) (0,0,5)", head)
    path.write_bytes(head + sep + body)
    return ct(path)


@case("ct-zip-bomb", 2, "zip bomb")
def _(d):
    with zipfile.ZipFile(d / "bomb.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("slice.dcm", "w") as member:
            for _ in range(64):                        # 64 MB of zeros -> about 64 kB
                member.write(bytes(1 << 20))
    return ct(d / "bomb.zip")


@case("ct-zip-with-2001-files", 2, "2001 files")
def _(d):
    with zipfile.ZipFile(d / "many.zip", "w") as zf:
        for i in range(2001):
            zf.writestr(f"s/{i}.dcm", b"x")
    return ct(d / "many.zip")


def _nothing_escaped(out, d):
    assert not list(d.parent.rglob("escaped.txt")) and not Path("/abs_escaped.txt").exists()


@case("ct-zip-path-traversal", 2, "No DICOM series", check=_nothing_escaped)
def _(d):
    (d / "inside").mkdir()
    with zipfile.ZipFile(d / "inside" / "escape.zip", "w") as zf:
        zf.writestr("../../escaped.txt", b"written outside?")
        zf.writestr("/abs_escaped.txt", b"written outside?")
    return ct(d / "inside" / "escape.zip")


@case("ct-damaged-zip", 2, "")
def _(d):
    with zipfile.ZipFile(d / "series.zip", "w") as zf:
        zf.write(CT_SLICE, "s/a.dcm")
    data = bytearray((d / "series.zip").read_bytes())
    data[200:5000] = bytes(4800)                        # corrupt the member, keep the directory
    (d / "series.zip").write_bytes(bytes(data))
    return ct(d / "series.zip")


@case("ct-two-dicom-series-in-a-folder", 2, "2 DICOM series")
def _(d):
    from tests.test_io_ct import write_dicom_series

    image = sitk.ReadImage(str(SMALL_CT))
    write_dicom_series(image[:, :, :3], d / "mixed" / "a", "1.2.826.0.1.3680043.2.1125.7.1")
    write_dicom_series(image[:, :, 3:6], d / "mixed" / "b", "1.2.826.0.1.3680043.2.1125.7.2")
    return ct(d / "mixed")


@case("ct-radiograph-dicom", 2, "CR")
def _(d): return ct(CXR_DCM)


@case("ct-dicom-without-pixel-data", 2, "")
def _(d):
    ds = pydicom.dcmread(CT_SLICE)
    del ds.PixelData
    ds.save_as(d / "no_pixels.dcm")
    return ct(d / "no_pixels.dcm")


@case("ct-single-dicom-slice", 0, "single CT slice")
def _(d): return ct(CT_SLICE)


@case("ct-real-volume", 0, check=lambda out, d: out["warnings"] == [] and out["looks_like_chest_ct"]
      or pytest.fail(str(out)))
def _(d): return ct(SMALL_CT)


@case("ct-stored-in-ras", 0, "reoriented to LPS")
def _(d):
    image = sitk.DICOMOrient(sitk.ReadImage(str(SMALL_CT)), "RAS")
    sitk.WriteImage(image, str(d / "ras.nrrd"))
    return ct(d / "ras.nrrd")


@case("ct-raw-unsigned-values", 0, "raw unsigned")
def _(d):
    hu, image = small_hu()
    return ct(save((hu.astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16), d / "unsigned.nii.gz", like=image))


@case("ct-nrrd-content-named-nii-gz", 2, "not a readable|NIfTI")
def _(d):
    hu, image = small_hu()
    save(hu, d / "real.nrrd", like=image)
    shutil.copy(d / "real.nrrd", d / "wrong_extension.nii.gz")
    return ct(d / "wrong_extension.nii.gz")


def make_slab(d: Path) -> Path:
    """A 5-slice slab, 512 x 512 at 0.7 mm, of a body (0 HU) with air-filled lungs (-850 HU) in air (-1000 HU),
    float32 with a few NaN voxels: odd but valid, with two warnings (NaN voxels set, not a chest CT)."""
    path = d / "slab.nii.gz"
    if not path.exists():
        yy, xx = np.mgrid[:512, :512]
        body = ((yy - 256) / 180) ** 2 + ((xx - 256) / 230) ** 2 < 1
        lungs = (((yy - 240) / 110) ** 2 + ((np.abs(xx - 256) - 110) / 70) ** 2) < 1
        plane = np.where(body, np.where(lungs, -850.0, 0.0), -1000.0).astype(np.float32)
        slab = np.stack([plane] * 5)
        slab[2, 250:260, 250:260] = np.nan
        save(slab, path, spacing=(0.7, 0.7, 1.0))
    return path


def _same_warnings_as_inspect(out, d):
    """Issue 11 defect 3: the answer about a CT carries the warnings `inspect` gives for the same file, then (only
    for a scan the out-of-distribution check flags) the check's own sentence."""
    from engine.ood import OUT_OF_DISTRIBUTION_WARNING

    inspected = run_case(Case("inspect-slab", lambda _: ct(make_slab(d)), 0), d)
    assert inspected.payload["looks_like_chest_ct"] is False
    answer = out if "warnings" in out else out["indexed"][0]
    expected = list(inspected.payload["warnings"])
    if answer["in_distribution"] is False:
        expected.append(OUT_OF_DISTRIBUTION_WARNING.format(score=answer["ood_score"]))
    assert answer["warnings"] == expected, (answer["warnings"], expected)


@case("ct-slab-with-nan-inspect", 0, "does not look like a chest CT")
def _(d): return ct(make_slab(d))


@case("zeroshot-slab-carries-inspect-warnings", 0, "not numbers", check=_same_warnings_as_inspect)
def _(d): return ["zeroshot", "--ct", str(make_slab(d)), "--json"]


@case("index-slab-carries-inspect-warnings", 0, "does not look like a chest CT", check=_same_warnings_as_inspect)
def _(d): return ["index", "--ct", str(make_slab(d)), "--library", str(d / "library"), "--json"]


@case("zeroshot-png", 2, "2-D")
def _(d): return ["zeroshot", "--ct", str(CXR_PNG), "--json"]


@case("zeroshot-missing", 2, "does not exist")
def _(d): return ["zeroshot", "--ct", str(d / "missing.nii.gz"), "--json"]


@case("index-missing", 2, "does not exist")
def _(d): return ["index", "--ct", str(d / "nothing"), "--library", str(d / "lib"), "--json"]


# ================================================================================================== radiographs

@case("cxr-folder", 2, "is a folder")
def _(d):
    (d / "films").mkdir()
    return cxr(d / "films")


@case("cxr-20000-square-png", 2, "million")
def _(d):
    # A real 20000 x 20000 grey PNG (400 M pixels of black, streamed: about 0.4 MB on disk).
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    packer = zlib.compressobj(9)
    row = bytes(20001)                                  # filter byte + 20000 pixels
    idat = b"".join(packer.compress(row * 500) for _ in range(40)) + packer.flush()
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    (d / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
                                 + chunk(b"IEND", b""))
    return cxr(d / "huge.png")


@case("cxr-ct-volume", 2, "CT volume")
def _(d): return cxr(SMALL_CT)


@case("cxr-ct-dicom-slice", 2, "CT image")
def _(d): return cxr(CT_SLICE)


@case("cxr-markdown-file", 2, "not an image")
def _(d): return cxr(SHARED_DATA / "README.md")


@case("cxr-pdf-renamed-png", 2, "not an image")
def _(d):
    (d / "film.png").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer\n%%EOF\n")
    return cxr(d / "film.png")


@case("cxr-empty-file", 2, "empty")
def _(d):
    (d / "empty.png").write_bytes(b"")
    return cxr(d / "empty.png")


@case("cxr-missing", 2, "does not exist")
def _(d): return cxr(d / "missing.png")


@case("cxr-truncated-png", 2, "damaged")
def _(d):
    data = CXR_PNG.read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 3])
    return cxr(d / "truncated.png")


@case("cxr-blank", 2, "blank")
def _(d):
    Image.fromarray(np.full((300, 300), 128, np.uint8)).save(d / "blank.png")
    return cxr(d / "blank.png")


@case("cxr-16x16", 2, "too small")
def _(d):
    Image.fromarray(np.asarray(Image.open(CXR_PNG).convert("L").resize((16, 16)))).save(d / "icon.png")
    return cxr(d / "icon.png")


@case("cxr-8x8", 2, "too small")
def _(d):
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(d / "tiny.png")
    return cxr(d / "tiny.png")


@case("cxr-cmyk-jpeg", 0, check=lambda out, d: out["shape"] == [512, 512] or pytest.fail(str(out)))
def _(d):
    Image.open(CXR_PNG).convert("CMYK").save(d / "cmyk.jpg", quality=90)
    return cxr(d / "cmyk.jpg")


@case("cxr-animated-gif", 0, "frames")
def _(d):
    film = Image.open(CXR_PNG).convert("L")
    film.save(d / "animated.gif", save_all=True, append_images=[film.rotate(5), film.rotate(10)], duration=100)
    return cxr(d / "animated.gif")


@case("cxr-colour-photo", 0, "colour")
def _(d):
    grey = np.asarray(Image.open(CXR_PNG).convert("L"))
    Image.fromarray(np.stack([grey, grey // 2, 255 - grey], -1)).save(d / "colour.png")
    return cxr(d / "colour.png")


@case("cxr-real-png", 0, check=lambda out, d: out["warnings"] == [] or pytest.fail(str(out)))
def _(d): return cxr(CXR_PNG)


@case("cxr-dicom-without-pixel-data", 2, "holds no image")
def _(d):
    ds = pydicom.dcmread(CXR_DCM)
    del ds.PixelData
    ds.save_as(d / "no_pixels.dcm")
    return cxr(d / "no_pixels.dcm")


# ======================================================================================================== audio

@case("audio-nan-samples", 2, "not numbers")
def _(d):
    samples = tone(2.0, 16000).astype(np.float32)
    samples[8000:8100] = np.nan
    soundfile.write(d / "nan.wav", samples, 16000, subtype="FLOAT")
    return audio(d / "nan.wav")


@case("audio-all-inf", 2, "not numbers|no numbers")
def _(d):
    soundfile.write(d / "inf.wav", np.full(32000, np.inf, np.float32), 16000, subtype="FLOAT")
    return audio(d / "inf.wav")


@case("audio-10-s-at-1-hz", 2, "1 Hz")
def _(d):
    soundfile.write(d / "one_hz.wav", tone(10.0, 1).astype(np.float32) + 0.5, 1, subtype="FLOAT")
    return audio(d / "one_hz.wav")


@case("audio-8-khz", 0, "8000 Hz")
def _(d):
    soundfile.write(d / "phone.wav", tone(2.0, 8000), 8000)
    return audio(d / "phone.wav")


@case("audio-48-khz-stereo", 0, check=lambda out, d: abs(out["seconds"] - 2.0) < 0.05 or pytest.fail(str(out)))
def _(d):
    soundfile.write(d / "stereo.wav", tone(2.0, 48000, channels=2), 48000)
    return audio(d / "stereo.wav")


@case("audio-clipped", 0, "clipped")
def _(d):
    soundfile.write(d / "clipped.wav", np.clip(tone(2.0, 16000, amplitude=4.0), -1, 1), 16000)
    return audio(d / "clipped.wav")


@case("audio-silent", 2, "silent")
def _(d):
    soundfile.write(d / "silent.wav", np.zeros(32000, np.int16), 16000)
    return audio(d / "silent.wav")


@case("audio-hiss-at-minus-70-dbfs", 2, "silent")
def _(d):
    hiss = (np.random.default_rng(0).normal(0, 10 ** (-70 / 20), 48000) * 32768).astype(np.int16)
    soundfile.write(d / "hiss.wav", hiss, 48000)
    return audio(d / "hiss.wav")


@case("audio-zero-samples", 2, "too short")
def _(d):
    soundfile.write(d / "zero.wav", np.zeros(0, np.int16), 16000)
    return audio(d / "zero.wav")


@case("audio-text-named-ogg", 2, "could not be decoded")
def _(d):
    (d / "notes.ogg").write_text("not a recording")
    return audio(d / "notes.ogg")


@case("audio-markdown-file", 2, "could not be decoded")
def _(d): return audio(SHARED_DATA / "README.md")


@case("audio-png", 2, "")
def _(d): return audio(CXR_PNG)


@case("audio-empty-file", 2, "empty")
def _(d):
    (d / "empty.wav").write_bytes(b"")
    return audio(d / "empty.wav")


@case("audio-riff-junk", 2, "")
def _(d):
    (d / "junk.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    return audio(d / "junk.wav")


@case("audio-wav-with-0-channels", 2, "")
def _(d):
    data = np.zeros(16000, np.int16).tobytes()
    fmt = struct.pack("<HHIIHH", 1, 0, 16000, 0, 0, 16)             # PCM, 0 channels
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    (d / "no_channels.wav").write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return audio(d / "no_channels.wav")


@case("audio-folder", 2, "folder")
def _(d):
    (d / "recordings").mkdir()
    return audio(d / "recordings")


@case("audio-zero-second-webm", 2, "")
def _(d):
    if not shutil.which("ffmpeg"):
        pytest.skip("ffmpeg makes the 0-second WebM")
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "anullsrc=r=48000:cl=mono", "-t", "0", "-c:a", "libopus", str(d / "zero.webm")], check=True)
    return audio(d / "zero.webm")


@case("audio-spoken-report", 0, check=lambda out, d: (out["sample_rate"] == 16000 and 0.5 < out["seconds"] < 5)
      or pytest.fail(str(out)))
def _(d):
    subprocess.run(["espeak-ng", "-w", str(d / "spoken.wav"), "Small right pleural effusion."], check=True)
    return audio(d / "spoken.wav")


# `retrieve --audio` refuses what it cannot answer before any model loads (so no speech checkpoint is needed here);
# the answerable odd recordings (90 s, 48 kHz stereo, clipped, noise, music) are in tests/test_speech_cli.py.

def retrieve_audio(path, *extra) -> list:
    return ["retrieve", "--audio", str(path), *extra, "--json"]


@case("audio-retrieve-word-under-1-s", 2, "at least 1 s")
def _(d):
    subprocess.run(["espeak-ng", "-s", "200", "-w", str(d / "no.wav"), "No."], check=True)
    return retrieve_audio(d / "no.wav")


@case("audio-retrieve-silent", 2, "silent")
def _(d):
    soundfile.write(d / "silent.flac", np.zeros(5 * 48000, np.int16), 48000)
    return retrieve_audio(d / "silent.flac")


@case("audio-retrieve-truncated-flac", 2, "")
def _(d):
    soundfile.write(d / "full.flac", tone(4.0, 16000), 16000)
    data = (d / "full.flac").read_bytes()
    (d / "cut.flac").write_bytes(data[: len(data) // 8])         # the header and a few frames: a broken upload
    return retrieve_audio(d / "cut.flac")


@case("audio-retrieve-missing", 2, "does not exist|not found|no such")
def _(d): return retrieve_audio(d / "dictation.wav")


@case("audio-retrieve-no-speech-checkpoint", 2, "python -m training speech --preset demo")
def _(d):
    subprocess.run(["espeak-ng", "-s", "140", "-w", str(d / "spoken.wav"), "Small right pleural effusion."],
                   check=True)
    return retrieve_audio(d / "spoken.wav", "--speech-weights", str(d / "no_checkpoint"))


# ================================================================================================ text and args

def retrieve(text) -> list:
    return ["retrieve", "--text", text, "--json"]


@case("text-empty", 2, "empty")
def _(d): return retrieve("")


@case("text-chinese", 2, "English")
def _(d): return retrieve("右側胸水と肺気腫")


@case("text-german", 2, "English")
def _(d): return retrieve("Befund: Lungenemphysem beidseits, Kardiomegalie, kleiner Pleuraerguss rechts.")


@case("text-invalid-utf8-byte", 2, "UTF-8")
def _(d): return [b"retrieve", b"--text", b"right pleural \xff effusion", b"--json"]


@case("text-english-with-accented-name", 0, check=lambda out, d: len(out["results"]) == 3 or pytest.fail(str(out)))
def _(d): return ["retrieve", "--text", "Findings consistent with Löfgren syndrome and hilar adenopathy.", "--k", "3",
                  "--library", str(d / "lib"), "--json"]


@case("args-k-zero", 2, "--k")
def _(d): return ["retrieve", "--text", "emphysema", "--k", "0", "--json"]


@case("args-k-not-a-number", 2, "Invalid arguments")
def _(d): return ["retrieve", "--text", "emphysema", "--k", "ten", "--json"]


@case("args-paper-preset-without-weights", 2, "")
def _(d): return ["retrieve", "--text", "emphysema", "--preset", "paper", "--json"]


@case("args-phantom-negative-seed", 2, "--seed")
def _(d): return ["phantom", "--labels", "", "--seed", "-1", "--out", str(d / "p.nii.gz"), "--json"]


@case("args-phantom-seed-2-to-the-40", 0, check=lambda out, d: out["seed"] == 2**40 or pytest.fail(str(out)))
def _(d): return ["phantom", "--seed", str(2**40), "--out", str(d / "p.nii.gz"), "--json"]


@case("args-phantom-seed-not-a-number", 2, "Invalid arguments")
def _(d): return ["phantom", "--seed", "abc", "--out", str(d / "p.nii.gz"), "--json"]


@case("args-phantom-labels-only-commas", 2, "names no label")
def _(d): return ["phantom", "--labels", ",,,", "--out", str(d / "p.nii.gz"), "--json"]


@case("args-phantom-unknown-label", 2, "Unknown label")
def _(d): return ["phantom", "--labels", "Pneumothorax", "--out", str(d / "p.nii.gz"), "--json"]


@case("args-phantom-out-png", 2, r"\.nii\.gz")
def _(d): return ["phantom", "--labels", "Emphysema", "--out", str(d / "x.png"), "--json"]


@case("args-phantom-out-unwritable", 2, "cannot be written")
def _(d): return ["phantom", "--labels", "", "--out", "/proc/phantom.nii.gz", "--json"]


@case("args-phantom-out-under-a-file", 2, "not a folder")
def _(d): return ["phantom", "--labels", "", "--out", "/dev/null/phantom.nii.gz", "--json"]


@case("args-phantom-out-is-a-folder", 2, "is a folder")
def _(d):
    (d / "folder.nii.gz").mkdir()
    return ["phantom", "--labels", "", "--out", str(d / "folder.nii.gz"), "--json"]


@case("args-unknown-verb", 2, "Invalid arguments")
def _(d): return ["nonsense-verb", "--json"]


@case("args-inspect-without-input", 2, "exactly one")
def _(d): return ["inspect", "--json"]


@case("args-inspect-two-inputs", 2, "exactly one")
def _(d): return ["inspect", "--ct", str(SMALL_CT), "--cxr", str(CXR_PNG), "--json"]


# ================================================================================================== the runner

@dataclass
class Result:
    status: int
    payload: dict | None
    stdout: str
    stderr: str
    rss_mb: float
    cpu_s: float
    notes: list = field(default_factory=list)


# The engine runs as the child of a small wrapper process, which reports the engine's own peak RSS and CPU time
# (os.wait4). Linux counts the memory a process had before exec in its ru_maxrss, so measured straight from this
# (large) pytest process the engine would be charged with pytest's memory; the wrapper holds about 10 MB.
WRAPPER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-m", "engine", *sys.argv[1:]])
_, status, usage = os.wait4(pid, 0)
with open(os.environ["HOSTILE_RUSAGE_FILE"], "w") as f:
    f.write(f"{usage.ru_maxrss} {usage.ru_utime + usage.ru_stime}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_case(c: Case, folder: Path) -> Result:
    """Run one case's CLI call in a child process (under WRAPPER): exit status, output, peak RSS, CPU time."""
    argv = c.build(folder)
    command = [os.fsencode(sys.executable), b"-c", WRAPPER.encode()] + [a if isinstance(a, bytes) else os.fsencode(a)
                                                                         for a in argv]
    usage_file = folder / "rusage.txt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CT_WORKSTATION_LIBRARY": str(folder / "user_library"),
           "HOSTILE_RUSAGE_FILE": str(usage_file)}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.run(command, cwd=ROOT, stdout=out, stderr=err, env=env, timeout=300)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    payload = json.loads(lines[0]) if len(lines) == 1 else None
    maxrss_kb, cpu_s = usage_file.read_text().split()
    return Result(proc.returncode, payload, stdout, stderr, int(maxrss_kb) / 1024, float(cpu_s))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Every case, run two at a time, each in its own folder."""
    base = tmp_path_factory.mktemp("hostile")

    def one(c: Case):
        folder = base / c.id
        folder.mkdir()
        try:
            return c.id, (run_case(c, folder), folder)
        except pytest.skip.Exception as skipped:
            return c.id, (skipped, folder)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, CASES))


def assert_one_sentence(message: str) -> None:
    assert message and message[0].isupper() and message.rstrip().endswith((".", "?")), message
    assert "\n" not in message and "Traceback" not in message and len(message) < 600, message
    assert not re.search(r"[.!?]\s+[A-Z]", message), f"more than one sentence: {message}"


def test_corpus_is_large_and_covers_every_input_kind():
    kinds = {c.id.split("-")[0] for c in CASES}
    assert len(CASES) >= 60 and kinds >= {"ct", "cxr", "audio", "text", "args", "zeroshot", "index"}
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_hostile_input(corpus, c: Case):
    result, folder = corpus[c.id]
    if isinstance(result, BaseException):
        pytest.skip(str(result))
    assert result.payload is not None, f"expected exactly one JSON line: {result.stdout!r} / {result.stderr[-2000:]!r}"
    assert "Traceback" not in result.stderr, result.stderr
    assert not re.search(r"WARNING|ERROR|itk::|ExceptionObject|DecompressionBomb", result.stderr), result.stderr
    assert result.status == c.status, (result.status, result.payload, result.stderr[-2000:])
    assert result.rss_mb < c.max_rss_mb, f"peak memory {result.rss_mb:.0f} MB"
    if c.max_cpu_s is not None:
        assert result.cpu_s < c.max_cpu_s, f"{result.cpu_s:.2f} s of CPU"
    if c.status == 2:
        assert set(result.payload) == {"error"}, result.payload
        assert_one_sentence(result.payload["error"])
        assert re.search(c.expect, result.payload["error"], re.IGNORECASE), result.payload["error"]
    else:
        assert "error" not in result.payload, result.payload
        if c.expect:
            warnings = result.payload.get("warnings")
            if warnings is None:
                warnings = [w for item in result.payload.get("indexed", []) for w in item["warnings"]]
            assert any(re.search(c.expect, w, re.IGNORECASE) for w in warnings), warnings
            for w in warnings:
                assert_one_sentence(w)
    if c.check is not None:
        c.check(result.payload, folder)


def test_plain_output_errors_go_to_stderr(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "engine", "inspect", "--ct", str(tmp_path / "nope.nii")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
