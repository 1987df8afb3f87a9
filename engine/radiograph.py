"""Chest radiographs (CXR): reading PNG / JPEG / DICOM into one grey image, and normalising it for a model.

A `Radiograph` is float32 (H, W) in [0, 1] where higher = brighter as displayed = more attenuation (bone white, air
black), whatever the file stored:
- 8-bit PNG/JPEG: value / 255 (as displayed). 16-bit PNG: stretched from its own 0.1st..99.9th percentiles (12-bit
  data in a 16-bit container is common). RGB/RGBA/palette: converted to grey (ITU-R 709 luma; alpha dropped).
  JPEG EXIF rotation (phone photos) is applied.
- DICOM (pydicom): the Modality LUT (rescale) and the VOI LUT or window the file specifies are applied
  (pydicom.pixels.apply_modality_lut / apply_voi_lut), MONOCHROME1 is inverted, then the result is scaled to [0, 1]
  (from its min..max when a window was applied or the data is 8-bit, else from the 0.1st..99.9th percentiles).
  Compressed transfer syntaxes pydicom cannot decode are read through SimpleITK (GDCM).
CT slices and volumes, non-images, empty, blank or tiny images raise UserError with one sentence.
"""
from __future__ import annotations

import warnings as python_warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.errors import UserError

if TYPE_CHECKING:  # torch is imported where a tensor is made: reading and refusing files stays fast
    import torch

MAX_PIXELS = 60_000_000        # about 7750 x 7750: larger "radiographs" are refused before decoding
MIN_SIDE = 64                  # pixels; smaller is an icon, not a radiograph (even a thumbnail has ~256)
CT_SOP_PREFIXES = ("1.2.840.10008.5.1.4.1.1.2",)   # CT Image Storage (and Enhanced CT, .1)
VOLUME_MODALITIES = {"CT", "MR", "PT", "NM"}


@dataclass
class Radiograph:
    """A grey radiograph: image float32 (H, W) in [0, 1] (higher = brighter = more attenuation, as displayed);
    pixel_spacing_mm = (row, column) mm from DICOM, else None."""
    image: np.ndarray
    pixel_spacing_mm: tuple[float, float] | None = None
    source: str = ""
    warnings: list[str] = field(default_factory=list)


def read_radiograph(path) -> Radiograph:
    """Read a chest radiograph from PNG, JPEG (or another Pillow format) or DICOM; see the module docstring."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"The path {path.name!r} is a folder, not a radiograph file.")
    if not path.is_file():
        raise UserError(f"The radiograph file {path.name!r} does not exist.")
    if path.stat().st_size == 0:
        raise UserError(f"The file {path.name!r} is empty.")
    with open(path, "rb") as f:
        head = f.read(132)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")):
        raise UserError(f"The file {path.name!r} is a CT volume, not a chest radiograph.")
    if head[128:132] == b"DICM" or name.endswith((".dcm", ".dicom")):
        image, spacing, warnings = _read_dicom(path)
    else:
        image, warnings = _read_picture(path)
        spacing = None
    if min(image.shape) < MIN_SIDE:
        raise UserError(f"The image {path.name!r} is only {image.shape[1]} x {image.shape[0]} pixels, "
                        "too small to be a radiograph.")
    if float(image.max() - image.min()) < 1e-3:
        raise UserError(f"The image {path.name!r} is blank (every pixel has the same value).")
    return Radiograph(image=np.ascontiguousarray(image, dtype=np.float32), pixel_spacing_mm=spacing,
                      source=str(path), warnings=warnings)


# -------------------------------------------------------------------------------------------------- PNG, JPEG ...

def _read_picture(path: Path) -> tuple[np.ndarray, list[str]]:
    from PIL import Image, ImageOps, UnidentifiedImageError

    warnings: list[str] = []
    try:
        with python_warnings.catch_warnings():   # Pillow's DecompressionBombWarning: the size is checked below
            python_warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
        with opened as im:
            if im.width * im.height > MAX_PIXELS:
                raise UserError(f"The image {path.name!r} has {im.width} x {im.height} pixels, more than the "
                                f"{MAX_PIXELS // 1_000_000} million this workstation reads.")
            if getattr(im, "n_frames", 1) > 1:
                warnings.append(f"The image holds {im.n_frames} frames (an animation); only the first was read.")
            im = ImageOps.exif_transpose(im)
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                array = np.asarray(im, dtype=np.float32)
                return _stretch(array, robust=True), warnings
            if mode == "L":
                return np.asarray(im, dtype=np.float32) / 255.0, warnings
            if mode == "1":
                return np.asarray(im.convert("L"), dtype=np.float32) / 255.0, warnings
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except UserError:
        raise
    except Image.DecompressionBombError:    # over twice Pillow's own limit: refused by Pillow before our check
        raise UserError(f"The image {path.name!r} has more than {2 * Image.MAX_IMAGE_PIXELS // 1_000_000} million "
                        f"pixels, more than the {MAX_PIXELS // 1_000_000} million this workstation reads.") from None
    except UnidentifiedImageError:
        raise UserError(f"The file {path.name!r} is not an image this workstation can read "
                        "(PNG, JPEG or DICOM).") from None
    except (OSError, ValueError, SyntaxError):
        raise UserError(f"The image {path.name!r} is damaged or truncated.") from None
    return _to_grey(rgb, warnings), warnings


def _to_grey(rgb: np.ndarray, warnings: list[str]) -> np.ndarray:
    """(H, W, 3) in [0, 1] -> (H, W) luma; warns when the picture really has colour (not a radiograph export)."""
    from skimage.color import rgb2gray

    if float(np.abs(rgb - rgb.mean(axis=2, keepdims=True)).mean()) > 0.02:
        warnings.append("The image is in colour; it was converted to grey.")
    return rgb2gray(rgb).astype(np.float32)


def _stretch(array: np.ndarray, robust: bool) -> np.ndarray:
    """Scale to [0, 1] from min..max, or from the 0.1st..99.9th percentiles (clipped) when `robust`."""
    lo, hi = (np.percentile(array, [0.1, 99.9]) if robust else (array.min(), array.max()))
    if hi <= lo:
        lo, hi = float(array.min()), float(array.max())
    if hi <= lo:
        return np.zeros(array.shape, dtype=np.float32)
    return np.clip((array - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------- DICOM

def _read_dicom(path: Path) -> tuple[np.ndarray, tuple[float, float] | None, list[str]]:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    warnings: list[str] = []
    try:
        ds = pydicom.dcmread(path)
    except Exception:  # pydicom raises several types for non-DICOM or damaged files
        raise UserError(f"The file {path.name!r} is not a readable DICOM file.") from None
    modality = str(ds.get("Modality", "") or "").upper()
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if modality in VOLUME_MODALITIES or sop_class.startswith(CT_SOP_PREFIXES):
        raise UserError(f"The DICOM file {path.name!r} is a {modality or 'CT'} image, not a chest radiograph.")
    if "PixelData" not in ds:
        raise UserError(f"The DICOM file {path.name!r} holds no image.")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise UserError(f"The DICOM file {path.name!r} holds several frames, not one radiograph.")
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows * columns > MAX_PIXELS:
        raise UserError(f"The DICOM image {path.name!r} has {columns} x {rows} pixels, more than this "
                        "workstation reads.")
    try:
        pixels = ds.pixel_array
    except Exception:  # no decoder for this transfer syntax in pydicom: GDCM (through SimpleITK) has more
        pixels = _pixels_with_gdcm(path)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        grey = _to_grey(_stretch(pixels[..., :3].astype(np.float32), robust=False), warnings)
        return grey, _pixel_spacing(ds), warnings
    if pixels.ndim != 2:
        raise UserError(f"The DICOM file {path.name!r} does not hold one 2-D grey image.")
    values = apply_modality_lut(pixels, ds).astype(np.float32)
    has_voi = "VOILUTSequence" in ds or "WindowCenter" in ds
    if has_voi:
        values = apply_voi_lut(values, ds).astype(np.float32)
    eight_bit = int(ds.get("BitsStored", 8) or 8) <= 8
    if eight_bit and not has_voi and photometric != "MONOCHROME1" and values.min() >= 0 and values.max() <= 255:
        image = values / 255.0            # shown as stored, like an 8-bit PNG
    else:
        image = _stretch(values, robust=not (has_voi or eight_bit))
    if photometric == "MONOCHROME1":    # MONOCHROME1: the lowest value is displayed white
        image = 1.0 - image
    return image.astype(np.float32), _pixel_spacing(ds), warnings


def _pixels_with_gdcm(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    try:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError:
        raise UserError(f"The DICOM image {path.name!r} uses a compression that cannot be decoded here.") from None
    return array[0] if array.ndim == 3 and array.shape[0] == 1 else array


def _pixel_spacing(ds) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2:
            try:
                return float(value[0]), float(value[1])
            except (TypeError, ValueError):
                return None
    return None


# --------------------------------------------------------------------------------------------------- for a model

def normalise_for_model(radiograph: Radiograph, size: int = 224, standardise: bool = False) -> "torch.Tensor":
    """float32 tensor (1, size, size): the image resized (aspect kept, skimage, anti-aliased) so its longer side is
    `size`, centred and padded with 0 (black, no attenuation). Values stay in [0, 1] (the range of the DRRs the
    CXR encoder trains on); with `standardise=True` they are shifted/scaled to zero mean, unit variance computed
    over the image (not the padding), the padding set to the image's own black level."""
    import torch
    from skimage.transform import resize

    image = radiograph.image
    h, w = image.shape
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    small = resize(image, (new_h, new_w), order=1, anti_aliasing=scale < 1, preserve_range=True).astype(np.float32)
    small = np.clip(small, 0.0, 1.0)
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    if standardise:
        mean, std = float(small.mean()), float(small.std()) or 1.0
        small = (small - mean) / std
        out[:] = (0.0 - mean) / std
    out[top:top + new_h, left:left + new_w] = small
    return torch.from_numpy(out)[None]
