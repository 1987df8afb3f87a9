"""Named, composable CT preprocessing steps (the MONAI way: small callables Volume -> Volume, chained by `Compose`).

Every step takes a `Volume` (array (z, y, x), spacing/origin (x, y, z) mm, LPS) and returns a new one; the geometry is
kept right at every step (resampling and crop/pad move the origin so each voxel keeps its place in the patient), so a
preprocessed volume can still be written with `write_nifti` and overlaid on the original.

Presets (`Preprocessing`) say, for each model, the grid and intensity mapping it was trained with:
- CTCLIP (CT-CLIP, the reference code): resample to (x, y, z) = (0.75, 0.75, 1.5) mm, clip [-1000, 1000] HU,
  divide by 1000, centre crop/pad to (z, y, x) = 240 x 480 x 480 with -1 (= -1000 HU) -> tensor (1, 240, 480, 480).
- TEXT2CT (Text2CT's code): clip [-1000, 1000] HU, resample to (0.75, 0.75, 3.0) mm, scale to [0, 1]
  ((HU + 1000) / 2000), then 128 x 512 x 512. The reference RESIZES the resampled volume to that shape trilinearly,
  which changes each axis' spacing by a different factor (distorting the anatomy unless the field of view happens to
  be 384 x 384 x 384 mm); we centre crop/pad instead (`fit="crop_or_pad"`, the spacing stays exact, as the paper
  describes), and offer `fit="resize"` to reproduce the reference code. Last step: FlipToRAS (the reference orients
  RAS), a named step of the chain like every other.
- DEMO: the embedded small models' grid, DEMO_SPACING_XYZ / DEMO_SHAPE_ZYX of engine.volume, clip [-1000, 1000] HU,
  divide by 1000, pad -1.
- DEMO_TOKEN_FEATURES: the demo grid in HU, NOT clipped (pad -1000 HU), then the `TokenFeatures` step: per-token
  features of engine/token_features.py (they need metal and dense calcium above the 1000 HU clip) -> (t, h, w, F).
Resampling is SimpleITK's linear interpolation (no anti-aliasing, like the references' trilinear
F.interpolate), with -1000 HU (air) outside the original volume.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import SimpleITK as sitk
import torch

from engine.volume import DEMO_SHAPE_ZYX, DEMO_SPACING_XYZ, Volume, volume_to_image

AIR_HU = -1000.0


# ------------------------------------------------------------------------------------------------------ resampling

def _resample(volume: Volume, size_xyz, spacing_xyz, origin_xyz, default_value: float = AIR_HU) -> Volume:
    """Linear resampling of `volume` onto the grid (size, spacing, origin) with the volume's own direction."""
    image = volume_to_image(volume, np.float32)
    out = sitk.Resample(image, [int(n) for n in size_xyz], sitk.Transform(), sitk.sitkLinear,
                        [float(o) for o in origin_xyz], [float(s) for s in spacing_xyz], image.GetDirection(),
                        float(default_value), sitk.sitkFloat32)
    return replace(volume, array=sitk.GetArrayFromImage(out), spacing=tuple(out.GetSpacing()),
                   origin=tuple(out.GetOrigin()), warnings=list(volume.warnings))


def _centre(volume: Volume) -> np.ndarray:
    """Physical position (x, y, z) mm of the volume's centre."""
    direction = np.asarray(volume.direction, dtype=float).reshape(3, 3)
    half = (np.asarray(volume.shape_xyz, dtype=float) - 1) / 2 * np.asarray(volume.spacing, dtype=float)
    return np.asarray(volume.origin, dtype=float) + direction @ half


def _origin_for_centre(centre, shape_xyz, spacing_xyz, direction) -> np.ndarray:
    half = (np.asarray(shape_xyz, dtype=float) - 1) / 2 * np.asarray(spacing_xyz, dtype=float)
    return np.asarray(centre, dtype=float) - np.asarray(direction, dtype=float).reshape(3, 3) @ half


def resample_to_grid(volume: Volume, shape_zyx, spacing_xyz, default_value: float = AIR_HU) -> Volume:
    """Resample onto a grid of `shape_zyx` voxels at `spacing_xyz` mm whose centre is the volume's centre.

    One linear resampling (cheaper than resample + crop/pad; the same up to sub-voxel centring). Outside the original
    volume the value is `default_value` (-1000 HU, air).
    """
    shape_xyz = tuple(int(n) for n in reversed(tuple(shape_zyx)))
    origin = _origin_for_centre(_centre(volume), shape_xyz, spacing_xyz, volume.direction)
    return _resample(volume, shape_xyz, spacing_xyz, origin, default_value)


@dataclass(frozen=True)
class ResampleToSpacing:
    """Resample to `spacing_xyz` mm (linear), keeping the physical extent: size = round(extent / spacing), centred."""
    spacing_xyz: tuple[float, float, float]
    default_value: float = AIR_HU

    def __call__(self, volume: Volume) -> Volume:
        extent = np.asarray(volume.shape_xyz, dtype=float) * np.asarray(volume.spacing, dtype=float)
        shape_xyz = np.maximum(1, np.rint(extent / np.asarray(self.spacing_xyz, dtype=float))).astype(int)
        if tuple(shape_xyz) == volume.shape_xyz and np.allclose(volume.spacing, self.spacing_xyz, rtol=0, atol=1e-9):
            return volume  # already on this grid (same size, spacing and centre): resampling is the identity
        return resample_to_grid(volume, tuple(reversed(shape_xyz)), self.spacing_xyz, self.default_value)


@dataclass(frozen=True)
class ResizeToShape:
    """Resample to exactly `shape_zyx` voxels covering the same extent (changes the spacing: distorts the aspect when
    the ratios differ). Only for reproducing references that resize (Text2CT); prefer ResampleToSpacing + crop/pad."""
    shape_zyx: tuple[int, int, int]
    default_value: float = AIR_HU

    def __call__(self, volume: Volume) -> Volume:
        extent = np.asarray(volume.shape_xyz, dtype=float) * np.asarray(volume.spacing, dtype=float)
        spacing_xyz = tuple(extent / np.asarray(tuple(reversed(self.shape_zyx)), dtype=float))
        return resample_to_grid(volume, self.shape_zyx, spacing_xyz, self.default_value)


# -------------------------------------------------------------------------------------------------- crop and pad

@dataclass(frozen=True)
class CenterCropOrPad:
    """Centre crop and/or pad the array to `shape_zyx` voxels with `pad_value` (in the volume's current units:
    -1000 for HU, -1 after ScaleHU to [-1, 1]). The origin moves so voxels keep their physical position.
    Where the difference is odd, the extra voxel is cropped from / padded at the high-index end (numpy/MONAI way)."""
    shape_zyx: tuple[int, int, int]
    pad_value: float = AIR_HU

    def __call__(self, volume: Volume) -> Volume:
        array = volume.array
        out = np.full(tuple(self.shape_zyx), self.pad_value, dtype=np.float32)
        src, dst, shift_zyx = [], [], []
        for have, want in zip(array.shape, self.shape_zyx):
            start = (have - want) // 2 if have >= want else -((want - have) // 2)  # first source index in the output
            lo, hi = max(start, 0), min(start + want, have)
            src.append(slice(lo, hi))
            dst.append(slice(lo - start, hi - start))
            shift_zyx.append(start)
        out[tuple(dst)] = array[tuple(src)]
        direction = np.asarray(volume.direction, dtype=float).reshape(3, 3)
        shift_mm = np.asarray(shift_zyx[::-1], dtype=float) * np.asarray(volume.spacing, dtype=float)
        origin = tuple(float(o) for o in np.asarray(volume.origin, dtype=float) + direction @ shift_mm)
        return replace(volume, array=out, origin=origin, warnings=list(volume.warnings))


# ------------------------------------------------------------------------------------------------------ intensity

@dataclass(frozen=True)
class ClipHU:
    """Clip values to [lo, hi] HU."""
    lo: float = -1000.0
    hi: float = 1000.0

    def __call__(self, volume: Volume) -> Volume:
        return replace(volume, array=np.clip(volume.array, self.lo, self.hi).astype(np.float32),
                       warnings=list(volume.warnings))


@dataclass(frozen=True)
class ScaleHU:
    """Map [hu_lo, hu_hi] linearly onto [out_lo, out_hi] (MONAI's ScaleIntensityRange, no clipping).
    CT-CLIP: (-1000, 1000) -> (-1, 1), i.e. HU / 1000; Text2CT: (-1000, 1000) -> (0, 1). The result is not HU."""
    hu_lo: float = -1000.0
    hu_hi: float = 1000.0
    out_lo: float = -1.0
    out_hi: float = 1.0

    def __call__(self, volume: Volume) -> Volume:
        unit = (volume.array - np.float32(self.hu_lo)) / np.float32(self.hu_hi - self.hu_lo)    # [0, 1]
        array = unit * np.float32(self.out_hi - self.out_lo) + np.float32(self.out_lo)
        return replace(volume, array=array.astype(np.float32), is_hu=False, warnings=list(volume.warnings))


# ---------------------------------------------------------------------------------------------------- orientation

@dataclass(frozen=True)
class FlipToRAS:
    """Reverse the y and x array axes: an LPS volume (row 0 anterior, column 0 patient's right) becomes RAS-ordered
    (row 0 posterior, column 0 patient's left), as Text2CT's reference orients its input. The geometry follows
    (origin at the new first voxel, direction columns of x and y negated), so every voxel keeps its place."""

    def __call__(self, volume: Volume) -> Volume:
        direction = np.asarray(volume.direction, dtype=float).reshape(3, 3)
        nx, ny, _ = volume.shape_xyz
        sx, sy, _ = volume.spacing
        origin = np.asarray(volume.origin, dtype=float) + direction @ np.array([(nx - 1) * sx, (ny - 1) * sy, 0.0])
        flipped = direction * np.array([-1.0, -1.0, 1.0])[None, :]
        return replace(volume, array=np.ascontiguousarray(volume.array[:, ::-1, ::-1]),
                       origin=tuple(float(o) for o in origin), direction=tuple(float(d) for d in flipped.ravel()),
                       warnings=list(volume.warnings))


class Compose:
    """Apply steps in order: Compose([ResampleToSpacing(...), ClipHU(...), ...])(volume)."""

    def __init__(self, steps):
        self.steps = list(steps)

    def __call__(self, volume: Volume) -> Volume:
        for step in self.steps:
            volume = step(volume)
        return volume

    def __repr__(self) -> str:
        return "Compose([\n" + "".join(f"    {step!r},\n" for step in self.steps) + "])"


# --------------------------------------------------------------------------------------------------------- presets

@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its CT: grid (spacing (x, y, z) mm, shape (z, y, x)), HU window, output range, pad value
    (in output units), the array orientation handed to the model, and how the shape is reached."""
    name: str
    spacing_xyz: tuple[float, float, float]
    shape_zyx: tuple[int, int, int]
    clip_hu: tuple[float, float] = (-1000.0, 1000.0)
    out_range: tuple[float, float] = (-1.0, 1.0)
    orientation: str = "LPS"          # "RAS" flips the y and x axes of the tensor (Text2CT's reference orients RAS)
    fit: str = "crop_or_pad"          # or "resize" (the Text2CT reference's distorting trilinear resize)
    # "" = a voxel tensor; else a TokenFeatureConfig preset ("demo" | "fast"): the chain keeps HU (clip_hu and
    # out_range are not applied) and `prepare` ends with TokenFeatures(preset) -> (t, h, w, F)
    token_features: str = ""

    @property
    def final_step(self) -> "TokenFeatures | None":
        """The step after the volume chain (TokenFeatures for a token-feature preset), else None."""
        return TokenFeatures(self.token_features) if self.token_features else None

    @property
    def pad_value(self) -> float:
        """Padding in output units: the image of -1000 HU (air): -1 for CT-CLIP, 0 for Text2CT."""
        (lo, hi), (out_lo, out_hi) = self.clip_hu, self.out_range
        return out_lo + (AIR_HU - lo) * (out_hi - out_lo) / (hi - lo)

    def transforms(self) -> Compose:
        """The whole chain, HU volume in, model-ready volume out (including the RAS flip when asked)."""
        lo, hi = self.clip_hu
        intensity = [ClipHU(lo, hi), ScaleHU(lo, hi, *self.out_range)]
        if self.token_features:      # HU kept whole: the features see metal and dense calcium
            if self.fit != "crop_or_pad" or self.orientation != "LPS":
                raise ValueError("token features take the LPS crop_or_pad chain")
            return Compose([ResampleToSpacing(self.spacing_xyz), CenterCropOrPad(self.shape_zyx, AIR_HU)])
        if self.fit == "resize":
            steps = [ClipHU(lo, hi), ResampleToSpacing(self.spacing_xyz), ResizeToShape(self.shape_zyx),
                     ScaleHU(lo, hi, *self.out_range)]
        else:
            steps = [ResampleToSpacing(self.spacing_xyz), *intensity, CenterCropOrPad(self.shape_zyx, self.pad_value)]
        if self.orientation == "RAS":
            steps.append(FlipToRAS())
        elif self.orientation != "LPS":
            raise ValueError(f"orientation must be 'LPS' or 'RAS', not {self.orientation!r}")
        return Compose(steps)

    def to_dict(self) -> dict:
        """JSON-ready fields (written as preprocessing.json into a checkpoint folder)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown preprocessing fields: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @classmethod
    def ctclip(cls) -> "Preprocessing":
        return cls("ctclip", (0.75, 0.75, 1.5), (240, 480, 480))

    @classmethod
    def text2ct(cls, fit: str = "crop_or_pad") -> "Preprocessing":
        return cls("text2ct", (0.75, 0.75, 3.0), (128, 512, 512), out_range=(0.0, 1.0), orientation="RAS", fit=fit)

    @classmethod
    def demo(cls) -> "Preprocessing":
        return cls("demo", tuple(DEMO_SPACING_XYZ), tuple(DEMO_SHAPE_ZYX))

    @classmethod
    def demo_token_features(cls, preset: str = "demo") -> "Preprocessing":
        """The demo grid in HU (no clip), then per-token features of TokenFeatureConfig.<preset>()."""
        return cls(f"demo-token-features-{preset}", tuple(DEMO_SPACING_XYZ), tuple(DEMO_SHAPE_ZYX),
                   token_features=preset)   # = CTCLIPConfig.demo_token_features().default_preprocessing()


@dataclass(frozen=True)
class TokenFeatures:
    """HU volume on the model grid -> per-token features (t, h, w, F) float32 (engine/token_features.py, preset
    "demo" = 71 features or "fast" = 45). The last step of a token-feature preset: it turns a volume into a token
    grid, so `prepare` applies it after the Volume -> Volume chain."""
    preset: str = "demo"

    def config(self):
        from engine.token_features import TokenFeatureConfig
        if self.preset not in ("demo", "fast"):
            raise ValueError(f"unknown token feature preset {self.preset!r}: 'demo' or 'fast'")
        return getattr(TokenFeatureConfig, self.preset)()

    def __call__(self, volume: Volume) -> np.ndarray:
        from engine.token_features import token_features
        return token_features(volume.array, volume.spacing, self.config())


CTCLIP = Preprocessing.ctclip()
TEXT2CT = Preprocessing.text2ct()
DEMO = Preprocessing.demo()
DEMO_TOKEN_FEATURES = Preprocessing.demo_token_features()


def prepare(volume: Volume, preprocessing: Preprocessing) -> tuple[Volume, torch.Tensor]:
    """The ONE way from an HU volume to a model input (engine, training and tests call it): (the preprocessed
    volume with its geometry, float32 tensor of ONE study, stacked for a batch): (1, z, y, x) in the preset's
    units, or for a token-feature preset the features (t, h, w, F) of the preprocessed HU volume."""
    prepared = preprocessing.transforms()(volume)
    final = preprocessing.final_step
    array = final(prepared) if final is not None else prepared.array[None]
    return prepared, torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def to_model_tensor(volume: Volume, preprocessing: Preprocessing = DEMO) -> torch.Tensor:
    """`prepare` without the volume: float32 tensor (1, z, y, x) (or (t, h, w, F) for a token-feature preset). Axes are LPS-ordered (row 0 anterior, column 0
    patient's right) unless preprocessing.orientation == "RAS" (the FlipToRAS step: row 0 posterior, column 0 left)."""
    return prepare(volume, preprocessing)[1]
