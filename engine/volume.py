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
MAX_VOXELS = 2 * 1024**3 // 4          # 2 GB of float32 voxels (about 800 x 800 x 800)
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
    Safety: voxel counts are checked from the header (ReadImageInformation) before any voxel is read, zips from their
    directory before extraction. DICOM patient tags are never read into the Volume, logged or written.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"The CT file or folder {path.name!r} does not exist.")
    if path.is_dir():
        return _read_dicom_folder(path, source=str(path))
    if path.stat().st_size == 0:
        raise UserError(f"The file {path.name!r} is empty.")
    if zipfile.is_zipfile(path):
        return _read_dicom_zip(path)
    return _read_image_file(path)


def _read_image_file(path: Path) -> Volume:
    """One file: NIfTI / NRRD / MHA / MHD / a DICOM slice (or a multi-frame DICOM)."""
    reader = _read_header(path)
    n_voxels = int(np.prod(reader.GetSize())) * reader.GetNumberOfComponents()
    _check_voxel_budget(n_voxels, path.name)
    header_scale = None
    if _is_nifti(path):
        header_scale = _check_nifti_complete(path)
    dicom = _dicom_kind(path)
    size = reader.GetSize()
    if reader.GetDimension() < 3 or (len(size) >= 3 and size[2] == 1 and dicom != "ct"):
        if dicom not in (None, "ct"):
            raise UserError(f"The file {path.name!r} is a 2-D {dicom} DICOM image, not a CT volume.")
        raise UserError(f"The file {path.name!r} is a 2-D image, not a CT volume.")
    if reader.GetDimension() > 3 or reader.GetNumberOfComponents() != 1:
        raise UserError(f"The file {path.name!r} is not a single-channel 3-D image, so it is not a CT volume.")
    try:
        image = reader.Execute()
    except RuntimeError:
        raise UserError(f"The file {path.name!r} could not be read completely (it may be truncated).") from None
    volume = _to_volume(image, source=str(path), header_scale=header_scale)
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
        reader.ReadImageInformation()
    except RuntimeError:
        if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif"):
            raise UserError(f"The file {path.name!r} is a 2-D picture, not a CT volume.") from None
        raise UserError(f"The file {path.name!r} is not a readable CT image (NIfTI, NRRD, MHA or DICOM).") from None
    if reader.GetDimension() < 2 or min(reader.GetSize()) < 1:
        raise UserError(f"The file {path.name!r} holds no image.")
    return reader


def _check_voxel_budget(n_voxels: int, name: str) -> None:
    if n_voxels > MAX_VOXELS:
        raise UserError(f"The CT {name!r} declares {n_voxels / 1e6:.0f} million voxels, more than the "
                        f"{MAX_VOXELS / 1e6:.0f} million this workstation reads.")


# --------------------------------------------------------------------------------------------------------- NIfTI

def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def _check_nifti_complete(path: Path) -> tuple[float, float]:
    """Check the file holds every voxel its header declares; return the header's (scl_slope, scl_inter).

    Written by hand because ITK's NIfTI reader silently fills a truncated .nii.gz with zeros. For .gz the gzip
    trailer's ISIZE field (uncompressed size mod 2**32) is compared with vox_offset + voxel bytes.
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
    dims, bitpix, vox_offset, slope, inter = fields
    expected = int(vox_offset) + int(np.prod(dims, dtype=np.int64)) * bitpix // 8
    if opener is gzip.open:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            actual = struct.unpack("<I", f.read(4))[0]
        complete = actual == expected % 2**32
    else:
        complete = path.stat().st_size >= expected
    if not complete:
        raise UserError(f"The file {path.name!r} is truncated: it holds fewer voxels than its header declares.")
    return slope, inter


def _parse_nifti_header(header: bytes):
    """(dims, bitpix, vox_offset, scl_slope, scl_inter) from a NIfTI-1 or NIfTI-2 header, or None."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:       # NIfTI-1
            dim = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            vox_offset, slope, inter = struct.unpack(endian + "3f", header[108:120])
            return dim[1:1 + max(1, min(dim[0], 7))], bitpix, max(vox_offset, 352.0), slope, inter
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:       # NIfTI-2
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dim = struct.unpack(endian + "8q", header[16:80])
            vox_offset = struct.unpack(endian + "q", header[168:176])[0]
            slope, inter = struct.unpack(endian + "2d", header[176:192])
            return dim[1:1 + max(1, min(dim[0], 7))], bitpix, max(vox_offset, 544), slope, inter
    return None


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
    _check_voxel_budget(int(np.prod(first.GetSize())) * len(files), Path(source).name)
    kind = _dicom_kind(Path(files[0]))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError:
        raise UserError(f"The DICOM series in {shown} could not be read (a file may be damaged).") from None
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
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    name = Path(source).name
    if not np.all(np.isfinite(array)):
        array[~np.isfinite(array)] = HU_FLOOR
        warnings.append("Non-finite voxel values (NaN or infinity) were set to -1024 HU.")
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
    if kind == "8bit":
        raise UserError(f"The CT {name!r} holds values between 0 and 255 only, an 8-bit windowed picture, "
                        "not Hounsfield units.")
    if kind != "hu":
        raise UserError(f"The image {name!r} does not look like CT in Hounsfield units "
                        "(no air at about -1000 HU), so it may be MRI or already normalised.")
    padding = array < PADDING_BELOW_HU
    if padding.any():
        warnings.append(f"Padding below -1500 HU (outside the scanner's field of view, {padding.mean():.1%} of "
                        "voxels) was set to -1024 HU.")
        array[padding] = HU_FLOOR
    return Volume(array=np.ascontiguousarray(array, dtype=np.float32), spacing=tuple(image.GetSpacing()),
                  origin=tuple(image.GetOrigin()), direction=tuple(image.GetDirection()), is_hu=True,
                  warnings=warnings, source=source)


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
    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise UserError(f"The output file must end in .nii.gz or .nii, not {path.name!r}.")
    if not path.parent.exists():
        raise UserError(f"The output folder {str(path.parent)!r} does not exist.")
    array = volume.array
    fits_int16 = (array.size > 0 and float(array.min()) >= -32768 and float(array.max()) <= 32767
                  and np.array_equal(np.rint(array), array))
    image = volume_to_image(volume, np.int16 if fits_int16 else np.float32)
    sitk.WriteImage(image, str(path), useCompression=path.name.lower().endswith(".gz"))
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
    if not chest:
        warnings.append(f"This does not look like a chest CT: {reason}.")
    return {
        "shape": [int(n) for n in volume.shape_xyz],
        "spacing": [round(float(s), 6) for s in volume.spacing],
        "orientation": orientation_code(volume.direction),
        "hu_range": [float(array.min()), float(array.max())] if array.size else [0.0, 0.0],
        "is_hu": is_hu,
        "looks_like_chest_ct": chest,
        "warnings": warnings,
    }


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
