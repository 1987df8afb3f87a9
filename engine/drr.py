"""Digitally reconstructed radiographs (DRRs): a chest radiograph simulated from any CT `Volume`.

Physics (the recipe of shared/notes/reference-implementations.md section 4):
1. HU -> linear attenuation: mu = MU_WATER_PER_MM * (1 + HU / 1000), clipped at 0 (air and the scanner's padding
   attenuate nothing). MU_WATER_PER_MM = 0.0193 /mm is water at 70 keV (NIST XCOM: 0.193 cm^2/g x 1 g/cm^3), the
   effective energy of a ~120 kVp chest beam. Metal: a CT file stores every metal at or near the 12-bit ceiling
   (3071 HU, 4x water), while steel and titanium attenuate some 12-25x water; a radiograph shows their true
   attenuation (sternal wires stand out over the spine). So voxels from METAL_FLOOR_HU up are taken as METAL_HU, the
   value the phantom paints metal at before the scanner's clip (engine/phantom/hu.py). Without it, wires over the
   spine add about 4 % to its optical depth and vanish on the film.
2. Line integrals along the anteroposterior axis: the volume is (z, y, x) in LPS, so the beam runs along y (array
   axis 1, +y = posterior) and the integral is sum(mu) * spacing_y (mm): a dimensionless optical depth.
3. Beer-Lambert: the transmitted fraction is exp(-integral); with a finite photon count the detector sees
   Poisson(photons * exp(-integral)) quanta (the augmentation's exposure and quantum noise).
4. Display: -log(transmitted fraction) (= the integral, so brighter = more attenuation, the convention of
   engine/radiograph.py), windowed from 0 (air) to a high percentile of the image, then a gamma.

Geometry: a PARALLEL projection. Measured alternative: `pip install --dry-run diffdrr` (0.6.1, cone-beam with a real
source distance) resolves 145 packages, among them vtk, pyvista, kornia, timm, torchvision and a torch 2.14 that
would replace the pinned 2.13; a parallel projection is one sum per pixel (well under a second for lung1 at full
resolution) and gives the same orientation, aspect and attenuation. What the parallel beam leaves out: magnification
(an AP film's heart is ~10 % larger than a PA film's because the heart is farther from the detector) and the
divergence of oblique rays at the film's edges.

Orientation (both views): the radiological display convention. Rows run from head (row 0) to feet, columns from the
patient's RIGHT (column 0) to the patient's left, so the heart is on the image's right half. Pixels are square
(`pixel_mm` on both axes): the projection, sampled at (spacing_z, spacing_x), is resampled so the image's aspect is
the physical field of view (extent_x : extent_z).

PA vs AP: in a parallel beam the line integral does not depend on the direction the ray travels, so the DISPLAYED PA
and AP images are identical (each is shown in the radiological convention). They differ in what the detector
records: `detector_view=True` returns the image as seen from the X-ray source looking through the patient at the
detector. For PA (source behind the patient) the patient's right is then on the viewer's RIGHT, so the detector-side
PA image is the display image mirrored left-right; for AP (source in front, facing the patient) it equals the display
image. tests/test_drr.py pins this relation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine.errors import UserError
from engine.radiograph import Radiograph
from engine.volume import Volume

MU_WATER_PER_MM = 0.0193          # linear attenuation of water at 70 keV, 1/mm (NIST XCOM)
METAL_FLOOR_HU = 2500.0           # above any bone or calcium (dense cortex stays under ~2000 HU), under the 3071 HU
#                                   ceiling so that a metal edge interpolated by resampling still counts as metal
METAL_HU = 15000.0                # what a metal voxel is taken to be: 16x water (titanium ~12x, steel ~25x at 70 keV)
VIEWS = ("pa", "ap")
WINDOW_PERCENTILE = 99.5          # the display window's white point: this percentile of the optical depth
DEFAULT_GAMMA = 1.0               # display gamma on the windowed optical depth (1: linear in log intensity)
# names the recipe in DRR caches (training/x2ct_data.py), so a change of these constants rebuilds them; a change of
# the code's physics must change the name by hand
DRR_RECIPE = f"parallel-70keV-metal{METAL_HU:g}-p{WINDOW_PERCENTILE:g}"


def attenuation_per_mm(hu: torch.Tensor) -> torch.Tensor:
    """HU -> linear attenuation coefficient mu (1/mm) at 70 keV, clipped at 0; metal (>= METAL_FLOOR_HU) at METAL_HU."""
    hu = torch.where(hu >= METAL_FLOOR_HU, torch.full_like(hu, METAL_HU), hu)
    return (MU_WATER_PER_MM * (1.0 + hu / 1000.0)).clamp_min(0.0)


@dataclass
class DRRAugmentation:
    """The mild realism applied to a DRR (all zero/None = the clean DRR).

    rotation_deg: the patient turned about the vertical (z) axis, degrees (an axial rotation of the volume before
    projection). tilt_deg: the detector tilted in the image plane, degrees. photons: incident quanta per pixel (None:
    noise-free; ~1e4..1e5 is a chest film's range: fewer = more quantum noise). exposure: multiplies the display
    window's white point (under/over exposure). gamma: display gamma. blur_mm: the detector's Gaussian point-spread,
    sigma in mm."""
    rotation_deg: float = 0.0
    tilt_deg: float = 0.0
    photons: float | None = None
    exposure: float = 1.0
    gamma: float = DEFAULT_GAMMA
    blur_mm: float = 0.0

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "DRRAugmentation":
        """A random mild augmentation (the ranges are a typical chest film's variation)."""
        return cls(rotation_deg=float(rng.uniform(-5, 5)), tilt_deg=float(rng.uniform(-3, 3)),
                   photons=float(10 ** rng.uniform(3.7, 5.0)), exposure=float(rng.uniform(0.85, 1.15)),
                   gamma=float(rng.uniform(0.8, 1.25)), blur_mm=float(rng.uniform(0.3, 1.2)))


def project(array_zyx: np.ndarray | torch.Tensor, spacing_xyz, pixel_mm: float | None = None,
            rotation_deg: float = 0.0) -> tuple[torch.Tensor, float]:
    """The parallel anteroposterior projection of any (z, y, x) LPS array (attenuation, or a mask to locate it):
    sum along y times spacing_y (mm), in display orientation (head up, patient's right on the image's left) on square
    pixels of `pixel_mm` (default: the finer of spacing x and z). Returns (float32 (H, W) tensor, pixel_mm).

    rotation_deg turns the array about the z axis (bilinear, zero outside) before projecting."""
    data = torch.as_tensor(np.asarray(array_zyx, dtype=np.float32) if not torch.is_tensor(array_zyx)
                           else array_zyx.float())
    sx, sy, sz = (float(s) for s in spacing_xyz)
    if rotation_deg:
        data = _rotate_axial(data, rotation_deg, sx, sy)
    line = data.sum(dim=1) * sy                       # (z, x): integral along y, mm x (1/mm)
    line = line.flip(0)                               # row 0 = most cranial (+z = head)
    pixel = float(pixel_mm) if pixel_mm else min(sx, sz)
    nz, nx = line.shape
    out_h, out_w = max(1, round(nz * sz / pixel)), max(1, round(nx * sx / pixel))
    square = F.interpolate(line[None, None], size=(out_h, out_w), mode="bilinear", align_corners=False,
                           antialias=out_h < nz or out_w < nx)[0, 0]
    return square, pixel


def _rotate_axial(data: torch.Tensor, degrees: float, sx: float, sy: float) -> torch.Tensor:
    """Rotate each axial slice of (z, y, x) about the volume's centre by `degrees` in physical space (anisotropic
    in-plane spacing respected). Hand-written with grid_sample: one batched call over the slices."""
    nz, ny, nx = data.shape
    angle = np.deg2rad(degrees)
    c, s = float(np.cos(angle)), float(np.sin(angle))
    half_x, half_y = nx * sx / 2, ny * sy / 2          # normalised coordinates -> mm and back
    theta = torch.tensor([[c, -s * half_y / half_x, 0.0], [s * half_x / half_y, c, 0.0]], dtype=torch.float32)
    grid = F.affine_grid(theta[None].expand(nz, 2, 3), [nz, 1, ny, nx], align_corners=False)
    return F.grid_sample(data[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


def optical_depth(volume: Volume, pixel_mm: float | None = None, rotation_deg: float = 0.0
                  ) -> tuple[torch.Tensor, float]:
    """The noise-free line integral of mu (dimensionless, -ln of the transmitted fraction) of a CT, display
    orientation, square pixels; (H, W) tensor and its pixel size in mm."""
    mu = attenuation_per_mm(torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32)))
    return project(mu, volume.spacing, pixel_mm=pixel_mm, rotation_deg=rotation_deg)


def to_display(depth: torch.Tensor, white: float | None = None, gamma: float = DEFAULT_GAMMA) -> np.ndarray:
    """Optical depth -> displayed grey in [0, 1]: window [0 (air), white] (default the WINDOW_PERCENTILE of the image),
    then a gamma. Brighter = more attenuation."""
    depth = depth.clamp_min(0.0)
    if white is None:
        white = float(torch.quantile(depth.flatten()[:: max(1, depth.numel() // 200_000)], WINDOW_PERCENTILE / 100))
    white = max(white, 1e-6)
    return ((depth / white).clamp(0.0, 1.0) ** gamma).numpy().astype(np.float32)


def simulate_radiograph(volume: Volume, view: str = "pa", augmentation: DRRAugmentation | None = None,
                        seed: int | None = None, pixel_mm: float | None = None,
                        detector_view: bool = False) -> Radiograph:
    """A DRR of `volume` as a `Radiograph` (float32 [0, 1], brighter = more attenuation, pixel_spacing_mm square).

    view: "pa" or "ap" (see the module docstring for what differs in a parallel beam). augmentation: None = the clean
    DRR; a DRRAugmentation applies its rotation, quantum noise (random stream from `seed`), detector blur, exposure and
    gamma. detector_view: return the image as the detector sees it from the source (PA: mirrored) instead of the
    radiological display."""
    view = str(view).lower()
    if view not in VIEWS:
        raise UserError(f"The view must be 'pa' or 'ap', not {view!r}.")
    if volume.array.ndim != 3 or min(volume.array.shape) < 2:
        raise UserError("A radiograph can only be simulated from a 3-D CT volume with at least 2 slices.")
    aug = augmentation or DRRAugmentation()
    depth, pixel = optical_depth(volume, pixel_mm=pixel_mm, rotation_deg=aug.rotation_deg)
    clean_white = float(torch.quantile(depth.flatten()[:: max(1, depth.numel() // 200_000)],
                                       WINDOW_PERCENTILE / 100))
    if aug.tilt_deg:
        depth = _tilt(depth, aug.tilt_deg)
    if aug.photons:
        generator = torch.Generator().manual_seed(int(seed or 0))
        counts = torch.poisson(aug.photons * torch.exp(-depth), generator=generator)
        depth = -torch.log(counts.clamp_min(0.5) / aug.photons)           # Beer-Lambert, as the detector counts
    if aug.blur_mm > 0:
        depth = _gaussian_blur(depth, aug.blur_mm / pixel)
    image = to_display(depth, white=clean_white * aug.exposure, gamma=aug.gamma)
    if detector_view and view == "pa":
        image = image[:, ::-1].copy()
    warnings = [] if aug == DRRAugmentation() else [f"augmented: {asdict(aug)}"]
    return Radiograph(image=image, pixel_spacing_mm=(pixel, pixel),
                      source=f"DRR ({view.upper()}) of {volume.source or 'a CT'}", warnings=warnings)


def _tilt(image: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate a 2-D image about its centre (square pixels), padding with 0 (air)."""
    angle = np.deg2rad(degrees)
    h, w = image.shape
    c, s = float(np.cos(angle)), float(np.sin(angle))
    theta = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], dtype=torch.float32)
    grid = F.affine_grid(theta[None], [1, 1, h, w], align_corners=False)
    return F.grid_sample(image[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0]


def _gaussian_blur(image: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Separable Gaussian blur, sigma in pixels (reflect padding)."""
    from scipy.ndimage import gaussian_filter

    return torch.from_numpy(gaussian_filter(image.numpy(), sigma=float(sigma_px), mode="reflect"))


def write_png(radiograph: Radiograph, path) -> None:
    """Save a radiograph's [0, 1] image as an 8-bit grey PNG (Pillow)."""
    from PIL import Image

    Image.fromarray(np.round(np.clip(radiograph.image, 0, 1) * 255).astype(np.uint8), mode="L").save(str(path))
