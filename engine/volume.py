"""The `Volume` type: one CT in Hounsfield units with its physical geometry.

Axis order and orientation (the project-wide convention):
- `array` is float32, indexed (z, y, x) as SimpleITK's GetArrayFromImage gives it.
- The engine orients every volume to LPS on read: +x = patient's left, +y = posterior, +z = head
  (so array[k] is an axial slice whose row 0 is the most anterior row and column 0 the patient's right,
  exactly radiological display: patient's right on the viewer's left, anterior up).
- `spacing` and `origin` are (x, y, z) in millimetres, as SimpleITK gives them; `direction` is SimpleITK's
  row-major 3 x 3 direction cosine matrix as a 9-tuple (identity after LPS orientation).
"""
from __future__ import annotations

import gzip
import os
import shutil
import struct
import tempfile
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from engine.errors import UserError

IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

# The demo grid: 128 x 128 x 64 voxels (x, y, z) covering 350 x 350 x 300 mm, the field of view of a chest CT.
DEMO_SHAPE_ZYX = (64, 128, 128)
DEMO_SPACING_XYZ = (350.0 / 128, 350.0 / 128, 300.0 / 64)


@dataclass
class Volume:
    """A CT volume: HU array in (z, y, x), spacing/origin in (x, y, z) mm, LPS orientation."""
    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = IDENTITY_DIRECTION
    is_hu: bool = True
    warnings: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def shape_xyz(self) -> tuple[int, int, int]:
        """Shape in SimpleITK's (x, y, z) order."""
        z, y, x = self.array.shape
        return (x, y, z)

    @property
    def extent_mm(self) -> tuple[float, float, float]:
        """Physical size (x, y, z) in millimetres."""
        return tuple(float(n * s) for n, s in zip(self.shape_xyz, self.spacing))


# ================================================================================================================
# Reading, writing and describing CT volumes.
#
# Everything below turns a file (or folder, or zip) into a `Volume` in HU and LPS, or refuses it with ONE sentence.
# Order of the checks in `read_ct`: size limits from headers (no voxel is allocated before) -> read with SimpleITK
# -> reorient to LPS -> decide from the VALUES (not the metadata) whether they are HU, raw stored values, an 8-bit
# windowed picture or not CT at all. DICOM patient identifiers are never read into anything the engine returns:
# only geometry, pixel data and two tags (Modality, SOP Class UID) are looked at.
# ================================================================================================================


# Limits checked before anything is allocated or extracted.
MAX_READ_BYTES = 3 * 1024**3          # memory a read may take at its peak (see `read_cost_bytes`)
MIN_SIDE_VOXELS = 16                   # in-plane voxels; fewer is not a CT slice (a CT slice has 512 x 512)
SPACING_RANGE_MM = (0.01, 100.0)       # a voxel side outside this range is a damaged header, not a CT
MAX_ZIP_TOTAL_BYTES = 4 * 1024**3      # sum of the uncompressed sizes in a zip
MAX_ZIP_FILES = 2000                   # members in a zip (a CT series rarely has more slices)
MAX_ZIP_RATIO = 200                    # uncompressed / compressed size; DICOM compresses ~2-10x, bombs ~1000x
MAX_FOLDER_FILES = 20000               # files walked in a DICOM folder

# Intensity bands (HU) used to recognise CT data by its values.
AIR_BAND_HU = (-1100.0, -850.0)        # outside air, trachea, aerated lung: every chest CT has some
SOFT_TISSUE_BAND_HU = (-200.0, 200.0)  # fat, water, muscle, blood, organs
BODY_THRESHOLD_HU = -400.0             # soft tissue and bone vs air and lung
RAW_UNSIGNED_OFFSET = 1024.0           # the usual RescaleIntercept of CT stored as unsigned values
HU_FLOOR = -1024.0                     # the value given to padding voxels (outside the scanner's field of view)
PADDING_BELOW_HU = -1500.0             # below this a value is padding (-2000, -2048, -3024), not air with noise

CT_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")


def read_ct(path) -> Volume:
    """Read a CT from NIfTI (.nii/.nii.gz), NRRD, MHA/MHD, a DICOM series (folder or .zip of one) or one DICOM slice.

    Returns a `Volume`: float32 HU, array (z, y, x), spacing/origin (x, y, z) mm, oriented to LPS with
    sitk.DICOMOrient (the orientation stored on disk, when not LPS, is recorded in `volume.warnings`).
    Intensities: SimpleITK applies DICOM RescaleSlope/Intercept and NIfTI scl_slope/scl_inter exactly once; the
    values are then checked (air near -1000 HU, soft tissue near 0, see `classify_intensities`): raw unsigned stored
    values (air near 0, intercept -1024 missing) are shifted by -1024 HU with a warning, a header rescale that would
    double-rescale HU data is undone with a warning, and anything else that is not CT in HU raises UserError. Padding
    voxels below -1500 HU (outside the scanner's field of view, -2048 or -3024) are set to -1024 HU with a warning.
    Safety: the memory a read would take (`read_cost_bytes`), the in-plane size and the voxel spacing are checked from
    the header (ReadImageInformation, and the raw spacing fields ITK would silently repair) before any voxel is read;
    a NIfTI's voxel bytes are streamed once to check they are all there; zips are checked from their directory
    before extraction. A volume that does not look like a chest CT is read with a warning in `volume.warnings` (so
    every answer about it carries it). DICOM patient tags are never read into the Volume, logged or written.
    """
    path = Path(path)
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError:                       # a symlink loop, a name too long, a folder without permission
        raise UserError(f"The CT path {path.name!r} cannot be opened (a broken link or no permission).") from None
    if not exists:
        if os.path.lexists(path):
            raise UserError(f"The CT path {path.name!r} is a link that leads nowhere (broken or a loop).")
        raise UserError(f"The CT file or folder {path.name!r} does not exist.")
    if is_dir:
        volume = _read_dicom_folder(path, source=str(path))
    elif path.stat().st_size == 0:
        raise UserError(f"The file {path.name!r} is empty.")
    elif zipfile.is_zipfile(path):
        volume = _read_dicom_zip(path)
    else:
        volume = _read_image_file(path)
    chest, reason = _chest_ct_evidence(volume, is_hu=True)
    if not chest:
        volume.warnings.append(_not_chest_warning(reason))
    return volume


def _read_image_file(path: Path) -> Volume:
    """One file: NIfTI / NRRD / MHA / MHD / a DICOM slice (or a multi-frame DICOM)."""
    declared = _declared_spacing(path)        # before ITK reads the header: it refuses some (inf) without saying why
    if declared is not None:
        _check_spacing(declared, path.name)
    reader = _read_header(path)
    size = reader.GetSize()
    if min(size[:2]) < MIN_SIDE_VOXELS:
        shown = " x ".join(str(n) for n in size)
        raise UserError(f"The file {path.name!r} holds only {shown} voxels, too small to be a CT volume.")
    _check_memory_budget(read_cost_bytes(reader), size, path.name)
    _check_spacing(tuple(reader.GetSpacing()), path.name)
    header_scale, non_finite_on_disk = None, 0
    if _is_nifti(path):
        header_scale, non_finite_on_disk = _check_nifti_complete(path)
        if non_finite_on_disk and non_finite_on_disk >= int(np.prod(size, dtype=np.int64)):
            raise UserError(f"The image {path.name!r} holds no numbers at all (every voxel is NaN or infinite).")
    dicom = _dicom_kind(path)
    if reader.GetDimension() < 3 or (len(size) >= 3 and size[2] == 1 and dicom != "ct"):
        if dicom not in (None, "ct"):
            raise UserError(f"The file {path.name!r} is a 2-D {dicom} DICOM image, not a CT volume.")
        raise UserError(f"The file {path.name!r} is a 2-D image, not a CT volume.")
    if reader.GetDimension() > 3 or reader.GetNumberOfComponents() != 1:
        raise UserError(f"The file {path.name!r} is not a single-channel 3-D image, so it is not a CT volume.")
    try:
        with _itk_quiet():
            image = reader.Execute()
    except RuntimeError:
        raise UserError(f"The file {path.name!r} could not be read completely (it may be truncated).") from None
    volume = _to_volume(image, source=str(path), header_scale=header_scale)
    del image
    if non_finite_on_disk:
        volume.warnings.insert(0, f"The file held {non_finite_on_disk:,} voxels that were not numbers (NaN or "
                                  "infinity); the NIfTI reader set them to 0.")
    if dicom not in (None, "ct"):
        volume.warnings.append(f"The DICOM modality is {dicom}, not CT; the values were checked and look like HU.")
    if volume.array.shape[0] == 1:
        volume.warnings.append("This is a single CT slice (z = 1), not a full volume.")
    return volume


def _read_header(path: Path) -> sitk.ImageFileReader:
    """Open the file's header only (ReadImageInformation reads no voxels)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _itk_quiet():
            reader.ReadImageInformation()
    except RuntimeError:
        if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif"):
            raise UserError(f"The file {path.name!r} is a 2-D picture, not a CT volume.") from None
        raise UserError(f"The file {path.name!r} is not a readable CT image (NIfTI, NRRD, MHA or DICOM).") from None
    if reader.GetDimension() < 2 or min(reader.GetSize()) < 1:
        raise UserError(f"The file {path.name!r} holds no image.")
    return reader


@contextmanager
def _itk_quiet():
    """ITK and the C libraries under it print on stderr themselves (ITK warnings such as "unexpected scales in
    sform", nifticlib's "** ERROR: bad datatype"): keep that raw text off the user's terminal while they run; what
    matters to the user is checked and said in one sentence here. The C-level stderr (file descriptor 2) is pointed
    at /dev/null for that time."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def read_cost_bytes(reader: sitk.ImageFileReader, n_files: int = 1) -> int:
    """Peak bytes `read_ct` allocates for an image with this header (times `n_files` slices for a DICOM series).

    Per voxel: the ITK image in its on-disk type, a second copy of it in that type (the LPS reorientation), the
    float32 HU array, one float32 temporary (header-scale undo, or a resampling input downstream) and 2 bytes of
    boolean masks (non-finite and padding voxels)."""
    itemsize = sitk.GetArrayViewFromImage(sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(),
                                                     reader.GetNumberOfComponents())).itemsize
    n_voxels = int(np.prod(reader.GetSize(), dtype=np.int64)) * n_files
    per_voxel = 2 * itemsize * reader.GetNumberOfComponents() + 4 + 4 + 2
    return n_voxels * per_voxel


def _check_memory_budget(cost: int, size, name: str) -> None:
    if cost > MAX_READ_BYTES:
        shown = " x ".join(str(n) for n in size)
        raise UserError(f"The CT {name!r} declares {shown} voxels, which would take {cost / 1024**3:.1f} GB of "
                        f"memory to read, more than the {MAX_READ_BYTES / 1024**3:.0f} GB this workstation allows.")


def _check_spacing(spacing, name: str) -> None:
    """Refuse a voxel spacing that is not a physical size: 0, negative, NaN, infinite, or outside SPACING_RANGE_MM."""
    lo, hi = SPACING_RANGE_MM
    if all(np.isfinite(s) and lo <= s <= hi for s in spacing[:3]):
        return
    shown = ", ".join(f"{s:g}" for s in spacing[:3])
    raise UserError(f"The CT {name!r} declares a voxel spacing of ({shown}) mm, but each side must be a positive "
                    f"number between {lo:g} and {hi:g} mm, so its header is damaged.")


def _declared_spacing(path: Path) -> tuple[float, ...] | None:
    """The spacing as the header writes it (x, y, z mm), before ITK replaces 0 or NaN with 1 and drops signs.
    Read by hand because no reader exposes the raw field: NIfTI pixdim[1..3], NRRD `spacings`/`space directions`,
    MetaImage `ElementSpacing`/`ElementSize`; None for other formats (DICOM: GDCM's values are checked)."""
    name = path.name.lower()
    try:
        if _is_nifti(path):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rb") as f:
                header = f.read(348)
            return _nifti_pixdim(header)
        if name.endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
            with open(path, "rb") as f:
                text = f.read(8192).split(b"\n\n", 1)[0].decode("latin-1")
            return _text_header_spacing(text)
    except (OSError, EOFError, zlib.error, struct.error, ValueError):
        return None
    return None


def _nifti_pixdim(header: bytes) -> tuple[float, ...] | None:
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            n = max(1, min(struct.unpack(endian + "h", header[40:42])[0], 3))
            return struct.unpack(endian + "3f", header[80:92])[:n]
    return None


def _text_header_spacing(text: str) -> tuple[float, ...] | None:
    """NRRD / MetaImage header text -> spacing floats ('nan' parses as NaN)."""
    for line in text.splitlines():
        key, sep, value = line.partition(":") if ":" in line.split("=")[0] else line.partition("=")
        key = key.strip().lower()
        if key in ("spacings", "elementspacing", "elementsize"):
            return tuple(float(v) for v in value.split())
        if key == "space directions":
            vectors = [v for v in value.replace(" ", "").replace(")(", ") (").split() if v != "none"]
            return tuple(float(np.linalg.norm([float(c) for c in v.strip("()").split(",")])) for v in vectors)
    return None


# --------------------------------------------------------------------------------------------------------- NIfTI

def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def _check_nifti_complete(path: Path) -> tuple[tuple[float, float], int]:
    """Check the file holds every voxel its header declares; return the header's (scl_slope, scl_inter) and the
    number of voxels that are NaN or infinite in the file (float data only).

    Written by hand because ITK's NIfTI reader silently fills a truncated .nii.gz with zeros, and sets NaN voxels to
    0 without a word. The voxel bytes are streamed 1 MB at a time and nothing is kept; a .gz is decompressed member
    after member (as concatenating or block-gzip tools write) until vox_offset + voxel bytes have come out: the gzip
    size trailer is not trusted (it can be forged, and a multi-member file has one per member).
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            header = f.read(540)
    except (OSError, EOFError):
        raise UserError(f"The file {path.name!r} is not a readable NIfTI file.") from None
    fields = _parse_nifti_header(header)
    if fields is None:
        raise UserError(f"The file {path.name!r} does not have a valid NIfTI header.")
    dims, bitpix, vox_offset, slope, inter, float_dtype = fields
    if min(dims) < 1:
        raise UserError(f"The file {path.name!r} holds no image (its header declares 0 voxels along an axis).")
    expected = int(vox_offset) + int(np.prod(dims, dtype=np.int64)) * bitpix // 8
    position, non_finite, carry = 0, 0, b""
    try:
        for piece in _payload_pieces(path, gzipped=opener is gzip.open):
            if float_dtype is not None:          # count NaN/inf in the voxel bytes of this piece
                lo, hi = max(int(vox_offset) - position, 0), max(min(expected - position, len(piece)), 0)
                data = carry + piece[lo:hi]
                usable = len(data) - len(data) % float_dtype.itemsize
                non_finite += int(np.count_nonzero(~np.isfinite(np.frombuffer(data[:usable], float_dtype))))
                carry = data[usable:]
            position += len(piece)
            if position >= expected:
                return (slope, inter), non_finite
    except (EOFError, zlib.error):
        pass                                     # the stream ended inside a gzip member, or is damaged
    raise UserError(f"The file {path.name!r} is truncated: it holds fewer voxels than its header declares.")


def _payload_pieces(path: Path, gzipped: bool, chunk: int = 1 << 20):
    """Yield the file's (decompressed) bytes about 1 MB at a time; raise EOFError if a gzip member is cut short."""
    with open(path, "rb") as f:
        if not gzipped:
            while piece := f.read(chunk):
                yield piece
            return
        stream = zlib.decompressobj(wbits=31)
        data = f.read(chunk)
        while True:
            yield stream.decompress(data, chunk)
            if stream.eof:                                     # one member ended: another may follow
                data = stream.unused_data or f.read(chunk)
                if data[:2] != b"\x1f\x8b":
                    return                                     # end of file, or trailing bytes ITK ignores too
                stream = zlib.decompressobj(wbits=31)
                continue
            data = stream.unconsumed_tail or f.read(chunk)
            if not data:
                yield stream.flush()
                if not stream.eof:
                    raise EOFError("gzip member cut short")
                return


def _parse_nifti_header(header: bytes):
    """(dims, bitpix, vox_offset, scl_slope, scl_inter) from a NIfTI-1 or NIfTI-2 header, or None."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:       # NIfTI-1
            dim = struct.unpack(endian + "8h", header[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            vox_offset, slope, inter = struct.unpack(endian + "3f", header[108:120])
            return (dim[1:1 + max(1, min(dim[0], 7))], bitpix, max(vox_offset, 352.0), slope, inter,
                    _nifti_float_dtype(datatype, endian))
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:       # NIfTI-2
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            dim = struct.unpack(endian + "8q", header[16:80])
            vox_offset = struct.unpack(endian + "q", header[168:176])[0]
            slope, inter = struct.unpack(endian + "2d", header[176:192])
            return (dim[1:1 + max(1, min(dim[0], 7))], bitpix, max(vox_offset, 544), slope, inter,
                    _nifti_float_dtype(datatype, endian))
    return None


def _nifti_float_dtype(datatype: int, endian: str) -> np.dtype | None:
    """numpy dtype of NIfTI's float32 (16) / float64 (64) voxels, None for other types."""
    return {16: np.dtype(endian + "f4"), 64: np.dtype(endian + "f8")}.get(datatype)


# --------------------------------------------------------------------------------------------------------- DICOM

def _dicom_kind(path: Path) -> str | None:
    """None if not DICOM, "ct" for a CT image, else the Modality (e.g. "CR"). Reads only Modality and SOP Class UID."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality", "SOPClassUID"])
    except Exception:  # not DICOM (pydicom raises several types)
        return None
    modality = str(ds.get("Modality", "") or "").upper()
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if modality == "CT" or sop_class in CT_SOP_CLASSES:
        return "ct"
    return modality or "non-CT"


def _read_dicom_folder(folder: Path, source: str, shown: str | None = None) -> Volume:
    """Read the one DICOM series found in `folder` (searched recursively) with sitk.ImageSeriesReader.
    `shown` names the input in messages ("the folder 'x'" or "the zip 'x.zip'")."""
    shown = shown or f"the folder {folder.name!r}"
    series = []  # (directory, series id)
    n_files = 0
    for directory, _, files in os.walk(folder):
        n_files += len(files)
        if n_files > MAX_FOLDER_FILES:
            raise UserError(f"{shown[0].upper()}{shown[1:]} holds more than {MAX_FOLDER_FILES} files; "
                            "pass the folder of one DICOM series.")
        if files:
            series += [(directory, sid) for sid in _series_ids(directory)]
    if not series:
        raise UserError(f"No DICOM series was found in {shown}.")
    if len(series) > 1:
        raise UserError(f"{shown[0].upper()}{shown[1:]} holds {len(series)} DICOM series; "
                        "pass a folder (or zip) with only one.")
    directory, series_id = series[0]
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(directory, series_id)
    first = _read_header(Path(files[0]))
    _check_memory_budget(read_cost_bytes(first, len(files)), (*first.GetSize()[:2], len(files)), Path(source).name)
    kind = _dicom_kind(Path(files[0]))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        with _itk_quiet():
            image = reader.Execute()
    except RuntimeError:
        raise UserError(f"The DICOM series in {shown} could not be read (a file may be damaged).") from None
    if min(image.GetSize()[:2]) < MIN_SIDE_VOXELS:
        raise UserError(f"{shown[0].upper()}{shown[1:]} holds images of only "
                        f"{image.GetSize()[0]} x {image.GetSize()[1]} pixels, too small to be a CT.")
    _check_spacing(tuple(image.GetSpacing()), Path(source).name)
    if image.GetSize()[2] == 1 and kind != "ct":
        raise UserError(f"{shown[0].upper()}{shown[1:]} holds a single 2-D {kind or 'non-CT'} DICOM image, "
                        "not a CT volume.")
    volume = _to_volume(image, source=source)
    if kind != "ct":
        volume.warnings.append(f"The DICOM modality is {kind}, not CT; the values were checked and look like HU.")
    if volume.array.shape[0] == 1:
        volume.warnings.append("This is a single CT slice (z = 1), not a full volume.")
    return volume


def _megabytes(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:,.0f} MB"


def _series_ids(directory: str) -> tuple[str, ...]:
    """GDCM's series ids in one directory, without ITK's "No Series were found" warning on stderr."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(directory))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _read_dicom_zip(path: Path) -> Volume:
    """A .zip of one DICOM series: sizes checked from the zip directory, then extracted to a temporary folder."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            total = sum(m.file_size for m in members)
            packed = sum(m.compress_size for m in members)
            if len(members) > MAX_ZIP_FILES:
                raise UserError(f"The zip {path.name!r} holds {len(members)} files, more than the "
                                f"{MAX_ZIP_FILES} accepted for one CT series.")
            if total > MAX_ZIP_TOTAL_BYTES:
                raise UserError(f"The zip {path.name!r} would unpack to {_megabytes(total)}, more than the "
                                f"{_megabytes(MAX_ZIP_TOTAL_BYTES)} accepted.")
            if total > 1e6 and total > MAX_ZIP_RATIO * max(packed, 1):
                raise UserError(f"The zip {path.name!r} is compressed {total / max(packed, 1):.0f} times, "
                                "which is how zip bombs look, so it was not unpacked.")
            with tempfile.TemporaryDirectory(prefix="ct_zip_") as tmp:
                folders: dict[str, Path] = {}
                for i, member in enumerate(members):
                    name = member.filename.replace("\\", "/")
                    if name.startswith("__MACOSX/") or name.rsplit("/", 1)[-1].startswith("."):
                        continue
                    # Members are written under numbered names (never the zip's own paths: no path traversal),
                    # keeping their folder as one level so series in different folders stay apart.
                    parent = name.rsplit("/", 1)[0] if "/" in name else ""
                    if parent not in folders:
                        folders[parent] = Path(tmp) / f"folder{len(folders):04d}"
                        folders[parent].mkdir()
                    folder = folders[parent]
                    with archive.open(member) as src, open(folder / f"{i:05d}", "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                return _read_dicom_folder(Path(tmp), source=str(path), shown=f"the zip {path.name!r}")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError):
        raise UserError(f"The zip {path.name!r} is damaged and could not be unpacked.") from None


# ---------------------------------------------------------------------------------------------- values and geometry

def _to_volume(image: sitk.Image, source: str, header_scale: tuple[float, float] | None = None) -> Volume:
    """SimpleITK image -> Volume: LPS orientation, float32, HU checked from the values."""
    warnings: list[str] = []
    on_disk = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    if on_disk != "LPS":
        image = sitk.DICOMOrient(image, "LPS")
        warnings.append(f"The file was stored in {on_disk} orientation and was reoriented to LPS.")
    geometry = (tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))
    array = sitk.GetArrayViewFromImage(image).astype(np.float32)     # one copy, in float32 (writable)
    del image
    name = Path(source).name
    finite = np.isfinite(array)
    if not finite.all():
        if not finite.any():
            raise UserError(f"The image {name!r} holds no numbers at all (every voxel is NaN or infinite).")
        warnings.append(f"The file held {np.count_nonzero(~finite):,} voxels that were not numbers (NaN or "
                        "infinity); they were set to -1024 HU.")
        array[~finite] = HU_FLOOR
    del finite
    kind = classify_intensities(array)
    if kind != "hu" and header_scale is not None and header_scale != (1.0, 0.0) and header_scale[0] != 0:
        slope, inter = header_scale
        undone = (array - np.float32(inter)) / np.float32(slope)
        if classify_intensities(undone) == "hu":
            array, kind = undone.astype(np.float32), "hu"
            warnings.append(f"The header's scaling (scl_slope {slope:g}, scl_inter {inter:g}) would rescale values "
                            "that are already HU a second time, so it was not applied.")
    if kind == "raw_unsigned":
        array -= np.float32(RAW_UNSIGNED_OFFSET)
        kind = classify_intensities(array)
        warnings.append("The values look like raw unsigned CT values (air near 0, RescaleIntercept missing), so "
                        "-1024 was added to make HU.")
    if kind != "hu":
        raise UserError(_why_not_hu(array, kind, name))
    padding = array < PADDING_BELOW_HU
    if padding.any():
        warnings.append(f"Padding below -1500 HU (outside the scanner's field of view, {padding.mean():.1%} of "
                        "voxels) was set to -1024 HU.")
        array[padding] = HU_FLOOR
    return Volume(array=np.ascontiguousarray(array, dtype=np.float32), spacing=geometry[0], origin=geometry[1],
                  direction=geometry[2], is_hu=True, warnings=warnings, source=source)


def _why_not_hu(array: np.ndarray, kind: str, name: str) -> str:
    """The one sentence that says why values that are not CT in HU were refused, from what the values are."""
    sample = array.ravel()[:: max(1, array.size // 2_000_000)]
    low, high = float(sample.min()), float(sample.max())
    if high <= BODY_THRESHOLD_HU and low >= AIR_BAND_HU[0] - 100:
        return (f"The image {name!r} holds only air (no value above {BODY_THRESHOLD_HU:g} HU), "
                "so there is no body in it to read.")
    if low == high:
        return f"Every voxel of the image {name!r} has the same value ({low:g}), so it holds no picture."
    if kind == "8bit":
        return (f"The CT {name!r} holds values between 0 and 255 only, an 8-bit windowed picture, "
                "not Hounsfield units.")
    if _fraction(sample, AIR_BAND_HU[0], AIR_BAND_HU[1]) < 0.01:
        return (f"The image {name!r} does not look like CT in Hounsfield units (no air at about -1000 HU), "
                "so it may be MRI or already normalised.")
    return (f"The image {name!r} does not look like CT in Hounsfield units (its air and soft-tissue values are not "
            "where CT puts them), so it may be MRI, rescaled twice or already normalised.")


def classify_intensities(array: np.ndarray) -> str:
    """Say what the values of a CT-sized array are: "hu", "raw_unsigned", "8bit" or "other".

    Decided from the values only (metadata can be wrong), on a strided subsample of <= 2 M voxels, ignoring a constant
    padding value below -1500:
    - "hu": >= 1 % of voxels in the air/lung band (-1100..-850 HU), <= 1 % below -1200 HU (so air is at -1000, not
      at -2000 as after a double rescale), >= 1 % body voxels (> -400 HU) of which >= 40 % are soft tissue
      (-200..200 HU), and a 99.5th percentile below 4000.
    - "raw_unsigned": minimum >= 0 and the same picture shifted by +1024 (air near 0, soft tissue near 1024), with
      some bone (>= 0.1 % of voxels above 1324, i.e. 300 HU): stricter, because these values will be changed.
    - "8bit": everything within 0..255 (a windowed picture).
    """
    flat = array.ravel()
    sample = flat[:: max(1, flat.size // 2_000_000)]
    if sample.size == 0:
        return "other"
    low, high = float(sample.min()), float(sample.max())
    if low >= 0 and high <= 255:
        return "8bit"
    if low < PADDING_BELOW_HU:
        sample = sample[sample != low]
        if sample.size == 0:
            return "other"
    if _looks_like_hu(sample, 0.0):
        return "hu"
    has_bone = _fraction(sample, 300 + RAW_UNSIGNED_OFFSET) >= 1e-3
    if low >= 0 and has_bone and _looks_like_hu(sample, RAW_UNSIGNED_OFFSET):
        return "raw_unsigned"
    return "other"


def _fraction(sample: np.ndarray, lo: float, hi: float = np.inf) -> float:
    return float(np.count_nonzero((sample >= lo) & (sample <= hi))) / sample.size


def _looks_like_hu(sample: np.ndarray, shift: float) -> bool:
    """The HU picture of a CT (air at -1000, a body mostly of soft tissue) in `sample` minus `shift`."""
    air = _fraction(sample, AIR_BAND_HU[0] + shift, AIR_BAND_HU[1] + shift)
    below_air = _fraction(sample, -np.inf, -1200 + shift)
    body = _fraction(sample, BODY_THRESHOLD_HU + shift)
    soft = _fraction(sample, SOFT_TISSUE_BAND_HU[0] + shift, SOFT_TISSUE_BAND_HU[1] + shift)
    top = float(np.percentile(sample, 99.5)) - shift
    return air >= 0.01 and below_air <= 0.01 and body >= 0.01 and soft >= 0.4 * body and top < 4000


# ------------------------------------------------------------------------------------------------------- writing

def volume_to_image(volume: Volume, pixel_type=None) -> sitk.Image:
    """The Volume as a SimpleITK image with its spacing, origin and direction (no other metadata)."""
    array = volume.array if pixel_type is None else volume.array.astype(pixel_type)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in volume.spacing))
    image.SetOrigin(tuple(float(o) for o in volume.origin))
    image.SetDirection(tuple(float(d) for d in volume.direction))
    return image


def write_nifti(volume: Volume, path) -> Path:
    """Write a Volume as NIfTI (.nii or .nii.gz) with its spacing, origin and direction (SimpleITK writes the
    LPS geometry as the RAS qform/sform NIfTI viewers expect). Values are stored as int16 HU when they are whole
    numbers within int16's range, else float32. No other metadata is written (no patient identifiers)."""
    path = check_output_path(path)
    array = volume.array
    fits_int16 = (array.size > 0 and float(array.min()) >= -32768 and float(array.max()) <= 32767
                  and np.array_equal(np.rint(array), array))
    image = volume_to_image(volume, np.int16 if fits_int16 else np.float32)
    try:
        with _itk_quiet():  # ITK's own error text would reach stderr; the sentence below says what went wrong
            sitk.WriteImage(image, str(path), useCompression=path.name.lower().endswith(".gz"))
    except RuntimeError:
        raise UserError(f"The file {str(path)!r} could not be written (the disk may be full or the place "
                        "read-only).") from None
    return path


def check_output_path(path) -> Path:
    """The path a NIfTI will be written to, or UserError: it must end in .nii/.nii.gz, in a folder that exists and
    can be written, and must not be a folder itself."""
    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise UserError(f"The output file must end in .nii.gz or .nii, not {path.name!r}.")
    if not path.parent.is_dir():
        missing = "is not a folder" if path.parent.exists() else "does not exist"
        raise UserError(f"The output folder {str(path.parent)!r} {missing}.")
    if path.is_dir():
        raise UserError(f"The output path {str(path)!r} is a folder, not a file name.")
    existed = path.exists()
    try:                                   # the one sure test (permissions, read-only mounts, /proc): open it
        with open(path, "ab"):
            pass
    except OSError:
        raise UserError(f"The output file {str(path)!r} cannot be written there (no permission, or a read-only "
                        "place).") from None
    if not existed:
        path.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------------------------------------ describing

# What makes a volume look like a chest CT (checked on axial slices resampled to about 4 mm in-plane).
CHEST_LUNG_FRACTION = 0.10     # a "chest slice" has at least this share of its body outline filled with air (lung)
CHEST_MIN_EXTENT_MM = 50.0     # cranio-caudal extent of chest slices
CHEST_MIN_WIDTH_MM = 200.0     # median body width on chest slices (an adult chest is ~320 mm; a crop is narrower)


def orientation_code(direction) -> str:
    """Three-letter orientation (SimpleITK/DICOM convention: "LPS" = identity direction) of a 3 x 3 direction."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(tuple(float(d) for d in direction))


def inspect_ct(volume: Volume) -> dict:
    """Describe a CT for the `inspect` verb: exactly the keys shape, spacing, orientation, hu_range, is_hu,
    looks_like_chest_ct, warnings. shape/spacing are (x, y, z) (voxels, mm); hu_range is [min, max] in HU;
    warnings include the reader's (e.g. the orientation the file had on disk, a single slice, values shifted)."""
    array = volume.array
    warnings = list(volume.warnings)
    is_hu = bool(volume.is_hu and array.size and classify_intensities(array) == "hu")
    chest, reason = _chest_ct_evidence(volume, is_hu)
    if not chest and _not_chest_warning(reason) not in warnings:
        warnings.append(_not_chest_warning(reason))
    return {
        "shape": [int(n) for n in volume.shape_xyz],
        "spacing": [round(float(s), 6) for s in volume.spacing],
        "orientation": orientation_code(volume.direction),
        "hu_range": [float(array.min()), float(array.max())] if array.size else [0.0, 0.0],
        "is_hu": is_hu,
        "looks_like_chest_ct": chest,
        "warnings": warnings,
    }


def _not_chest_warning(reason: str) -> str:
    return f"This does not look like a chest CT: {reason}."


def _chest_ct_evidence(volume: Volume, is_hu: bool) -> tuple[bool, str]:
    """(looks like a chest CT, why not). A chest slice: the largest body outline (> -400 HU, holes filled) with at
    least 10 % of its area below -400 HU (lungs, airways). Needs >= 50 mm of such slices, >= 200 mm wide."""
    from scipy import ndimage

    if not is_hu:
        return False, "its values are not Hounsfield units"
    sx, sy, sz = volume.spacing
    step = max(1, int(round(4.0 / max(min(sx, sy), 1e-3))))
    body = volume.array[:, ::step, ::step] > BODY_THRESHOLD_HU
    chest_widths = []
    for k in range(body.shape[0]):
        labels, n = ndimage.label(body[k])
        if n == 0:
            continue
        largest = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
        outline = ndimage.binary_fill_holes(largest)
        lung = outline & ~body[k]
        if lung.sum() >= CHEST_LUNG_FRACTION * outline.sum():
            columns = np.flatnonzero(outline.any(axis=0))
            chest_widths.append((columns[-1] - columns[0] + 1) * sx * step)
    extent = len(chest_widths) * sz
    if extent < CHEST_MIN_EXTENT_MM:
        return False, f"only {extent:.0f} mm of slices show air-filled lungs inside a body outline"
    width = float(np.median(chest_widths))
    if width < CHEST_MIN_WIDTH_MM:
        return False, f"the body is only {width:.0f} mm wide in the field of view (a cropped or small volume)"
    return True, ""
