"""What a radiologist sees: windowed slices with their true physical aspect, and a 3-D surface view.

Input volumes follow the project convention (engine/volume.py): float32 HU indexed (z, y, x) in LPS
(+x = patient's left, +y = posterior, +z = head), spacing (x, y, z) in mm.

Display convention (radiological), as returned by `plane_image`:
- axial    (index k along z): array[k] as is       -> patient's right on the viewer's left, anterior up.
- coronal  (index j along y): array[:, j, :] flipped vertically -> head up, patient's right on the viewer's left.
- sagittal (index i along x): array[:, :, i] flipped vertically -> head up, anterior on the viewer's left.
Every plane is resampled so that its pixels are square in millimetres (a 0.57 x 5 mm coronal plane is stretched to
its real height, never shown squashed): the output pixel size is the finer of the plane's two spacings.

3-D view (`surface_mesh`, `figure_3d`): marching cubes on a downsampled copy, with vertex coordinates in mm in the
volume's own (x, y, z) LPS frame, so proportions are right; the default camera looks from the front (anterior),
head up, patient's right on the viewer's left.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.measure import marching_cubes
from skimage.transform import resize

PLANES = ("axial", "coronal", "sagittal")

# Window presets: (level, width) in HU.
WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "bone": (400.0, 1800.0),
}

# Heat-map colour ramp for overlays (0 -> dark blue, 0.5 -> yellow-green, 1 -> red), a "jet"-like ramp written as a
# few anchor colours because matplotlib is not a dependency of the engine.
_HEAT_ANCHORS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_HEAT_RGB = np.array([[0, 0, 160], [0, 160, 255], [120, 255, 120], [255, 200, 0], [230, 20, 0]], dtype=np.float32)


# --------------------------------------------------------------------------------------------------------- windowing

def window(array_hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map HU to uint8 grey: level - width/2 -> 0, level + width/2 -> 255, linear in between, clipped."""
    width = max(float(width), 1.0)
    low = float(level) - width / 2.0
    scaled = (np.asarray(array_hu, dtype=np.float32) - low) * (255.0 / width)
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------- planes

def plane_count(volume, plane: str) -> int:
    """Number of slices of `plane` (axial: z, coronal: y, sagittal: x)."""
    z, y, x = volume.array.shape
    return {"axial": z, "coronal": y, "sagittal": x}[_check_plane(plane)]


def _check_plane(plane: str) -> str:
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {PLANES}, not {plane!r}")
    return plane


def _raw_plane(array: np.ndarray, plane: str, index: int) -> np.ndarray:
    """The plane as stored (no flip): axial (y, x), coronal (z, x), sagittal (z, y)."""
    if plane == "axial":
        return array[index]
    if plane == "coronal":
        return array[:, index, :]
    return array[:, :, index]


def _display_orient(raw: np.ndarray, plane: str) -> np.ndarray:
    """Flip a raw plane into the radiological display convention (see module docstring)."""
    return raw if plane == "axial" else raw[::-1]


def plane_spacing(volume, plane: str) -> tuple[float, float]:
    """(row, column) pixel size in mm of the raw plane."""
    sx, sy, sz = volume.spacing
    return {"axial": (sy, sx), "coronal": (sz, sx), "sagittal": (sz, sy)}[_check_plane(plane)]


def display_shape(volume, plane: str) -> tuple[int, int]:
    """(height, width) in pixels of `plane_image` output: square pixels of the finer in-plane spacing."""
    rows, cols = _raw_shape(volume.array.shape, plane)
    srow, scol = plane_spacing(volume, plane)
    pixel = min(srow, scol)
    return max(1, int(round(rows * srow / pixel))), max(1, int(round(cols * scol / pixel)))


def _raw_shape(shape_zyx, plane):
    z, y, x = shape_zyx
    return {"axial": (y, x), "coronal": (z, x), "sagittal": (z, y)}[plane]


def _to_square_pixels(image: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resample to `out_shape` (no-op when already there)."""
    if image.shape == tuple(out_shape):
        return image
    downsampling = out_shape[0] < image.shape[0] or out_shape[1] < image.shape[1]
    return resize(image, out_shape, order=1, preserve_range=True, anti_aliasing=downsampling).astype(np.float32)


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Map values in 0..1 to RGB float32 (..., 3) in 0..255 along the heat ramp."""
    v = np.clip(values, 0.0, 1.0)
    return np.stack([np.interp(v, _HEAT_ANCHORS, _HEAT_RGB[:, c]) for c in range(3)], axis=-1).astype(np.float32)


def plane_image(volume, plane: str, index: int, level: float, width: float, *, overlay: np.ndarray | None = None,
                overlay_alpha: float = 0.5) -> np.ndarray:
    """One windowed slice in display orientation with square pixels (see the module docstring).

    volume: a Volume (HU, (z, y, x), spacing (x, y, z) mm). index is clipped to the plane's range.
    level, width: the window in HU.
    overlay: optional heat map in 0..1, either the shape of the whole volume (z, y, x) or of the raw plane
        (axial (y, x), coronal (z, x), sagittal (z, y)); it is alpha-blended (alpha = overlay_alpha * value) over
        the grey image in the heat colour ramp.
    Returns uint8 (H, W) without overlay, uint8 (H, W, 3) with one; (H, W) = display_shape(volume, plane).
    """
    _check_plane(plane)
    array = volume.array
    index = int(np.clip(int(index), 0, plane_count(volume, plane) - 1))
    out_shape = display_shape(volume, plane)
    raw = _raw_plane(array, plane, index)
    grey = window(_to_square_pixels(_display_orient(raw, plane).astype(np.float32, copy=False), out_shape),
                  level, width)
    if overlay is None:
        return grey
    overlay = np.asarray(overlay, dtype=np.float32)
    if overlay.shape == array.shape:
        overlay = _raw_plane(overlay, plane, index)
    if overlay.shape != raw.shape:
        raise ValueError(f"overlay shape {overlay.shape} matches neither the volume {array.shape} "
                         f"nor the {plane} plane {raw.shape}")
    heat = np.clip(_to_square_pixels(_display_orient(overlay, plane), out_shape), 0.0, 1.0)
    return blend_heat(grey, heat, overlay_alpha)


def blend_heat(grey: np.ndarray, heat: np.ndarray, overlay_alpha: float = 0.5) -> np.ndarray:
    """uint8 grey (H, W) + heat map in 0..1 (H, W) -> uint8 RGB (H, W, 3): the heat colour ramp alpha-blended with
    alpha = overlay_alpha * value (a CT plane's heat map, a radiograph's class activation map)."""
    heat = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)
    alpha = (overlay_alpha * heat)[..., None]
    rgb = grey[..., None].astype(np.float32) * (1.0 - alpha) + heat_colors(heat) * alpha
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


DIFFERENCE_FLOOR_HU = 30.0        # |difference| drawn transparent up to here: the scale of CT noise, not a finding
DIFFERENCE_FULL_SCALE_HU = 300.0  # |difference| drawn at full colour: fluid (0 HU) against lung (-850 HU) reaches it


def difference_heat(difference_hu: np.ndarray, floor_hu: float = DIFFERENCE_FLOOR_HU,
                    full_scale_hu: float = DIFFERENCE_FULL_SCALE_HU) -> np.ndarray:
    """|difference| of two volumes (HU) as a heat map in 0..1 for plane_image's overlay: transparent up to
    `floor_hu`, full colour from `full_scale_hu`, linear in between."""
    magnitude = np.abs(np.asarray(difference_hu, dtype=np.float32))
    return np.clip((magnitude - floor_hu) / (full_scale_hu - floor_hu), 0.0, 1.0)


def radiograph_image(image: np.ndarray, overlay: np.ndarray | None = None, max_side: int = 1024,
                     min_side: int = 512, overlay_alpha: float = 0.5) -> np.ndarray:
    """A radiograph (float32 (H, W) in [0, 1], engine.radiograph's convention) for display: uint8 grey, its longer
    side brought into [min_side, max_side] pixels (aspect kept; shrunk anti-aliased, enlarged bilinearly, so a
    128-pixel simulated film fills its panel instead of sitting small in it); with `overlay` (0..1, the image's
    (H, W)) the heat ramp blended over it as plane_image does, uint8 RGB."""
    from skimage.transform import resize

    h, w = image.shape
    longer = max(h, w)
    scale = max_side / longer if longer > max_side else (min_side / longer if longer < min_side else 1.0)
    shape = (max(1, round(h * scale)), max(1, round(w * scale)))
    resized = image if scale == 1.0 else resize(image, shape, order=1, anti_aliasing=scale < 1, preserve_range=True)
    grey = np.round(np.clip(resized, 0.0, 1.0) * 255).astype(np.uint8)
    if overlay is None:
        return grey
    heat = overlay if scale == 1.0 else resize(np.asarray(overlay, np.float32), shape, order=1, preserve_range=True)
    return blend_heat(grey, heat, overlay_alpha)


# --------------------------------------------------------------------------------------------------------- 3-D

@dataclass
class Mesh:
    """A triangle surface: vertices (N, 3) in mm as (x, y, z) LPS, faces (M, 3) vertex indices."""
    vertices: np.ndarray
    faces: np.ndarray


def _downsample_factors(volume, max_voxels_per_axis: int) -> tuple[int, int, int]:
    """Integer block factors (z, y, x) bringing the volume near `max_voxels_per_axis` along its longest mm extent,
    with voxels as close to cubic in mm as integer factors allow."""
    sx, sy, sz = volume.spacing
    target_mm = max(volume.extent_mm) / max_voxels_per_axis
    return tuple(max(1, int(round(target_mm / s))) for s in (sz, sy, sx))


def _block_mean(mask: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Fraction of True voxels in each (fz, fy, fx) block (edges padded by replication)."""
    fz, fy, fx = factors
    z, y, x = mask.shape
    pad = ((0, -z % fz), (0, -y % fy), (0, -x % fx))
    m = np.pad(mask, pad, mode="edge").astype(np.float32)
    Z, Y, X = m.shape
    return m.reshape(Z // fz, fz, Y // fy, fy, X // fx, fx).mean(axis=(1, 3, 5))


def body_air_masks(array_hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bone, lungs) boolean masks from an HU volume (z, y, x).

    bone: > 250 HU. lungs: air (< -400 HU) enclosed by the body in its axial slice (body = > -400 HU with in-plane
    holes filled), keeping connected parts at least 2 % of the largest (drops bowel gas and noise).
    """
    bone = array_hu > 250
    air = array_hu < -400
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    body = ndimage.binary_fill_holes(~air, structure=in_plane)
    lungs = air & body
    labels, n = ndimage.label(lungs)
    if n:
        sizes = np.bincount(labels.ravel())[1:]
        keep = np.flatnonzero(sizes >= 0.02 * sizes.max()) + 1
        lungs = np.isin(labels, keep)
    return bone, lungs


def surface_mesh(volume, *, max_voxels_per_axis: int = 80, max_faces: int = 60_000) -> dict[str, Mesh]:
    """Bone and lung surfaces of a HU volume: {"bone": Mesh, "lungs": Mesh} (a part may be missing if absent).

    Masks are made at full resolution (body_air_masks), averaged into blocks so the longest extent has about
    `max_voxels_per_axis` voxels, and contoured at half occupancy (bone at 0.35, so thin ribs survive) with the
    downsampled spacing, so vertices are in mm and proportions are right. A surface with more than `max_faces`
    triangles (noisy contrast-filled vessels above 250 HU, say) is contoured again on a coarser step, so the browser
    stays responsive.
    """
    factors = _downsample_factors(volume, max_voxels_per_axis)
    sx, sy, sz = volume.spacing
    spacing_zyx = (sz * factors[0], sy * factors[1], sx * factors[2])
    bone, lungs = body_air_masks(volume.array)
    meshes = {}
    for name, mask, level in (("bone", bone, 0.35), ("lungs", lungs, 0.5)):
        frac = _block_mean(mask, factors)
        if frac.max() <= level or frac.min() >= level:
            continue
        frac = np.pad(frac, 1)  # closed surfaces where a structure leaves the field of view
        verts, faces, _, _ = marching_cubes(frac, level=level, spacing=spacing_zyx)
        if len(faces) > max_faces:
            step = int(np.ceil(np.sqrt(len(faces) / max_faces)))
            verts, faces, _, _ = marching_cubes(frac, level=level, spacing=spacing_zyx, step_size=step)
        verts -= np.array(spacing_zyx)  # undo the pad
        xyz = verts[:, ::-1] + np.array(volume.origin, dtype=np.float64)
        meshes[name] = Mesh(vertices=xyz.astype(np.float32), faces=faces.astype(np.int32))
    return meshes


def figure_3d(volume, *, max_voxels_per_axis: int = 80, max_faces: int = 60_000):
    """A plotly Figure of the bone (white) and lung (translucent pink) surfaces, equal aspect in mm, seen from the
    front (patient's right on the viewer's left, head up)."""
    import plotly.graph_objects as go

    style = {"bone": dict(color="#f4f1e8", opacity=1.0), "lungs": dict(color="#f29595", opacity=0.35)}
    fig = go.Figure()
    for name, mesh in surface_mesh(volume, max_voxels_per_axis=max_voxels_per_axis,
                                             max_faces=max_faces).items():
        x, y, z = mesh.vertices.T
        i, j, k = mesh.faces.T
        fig.add_trace(go.Mesh3d(x=x, y=y, z=z, i=i, j=j, k=k, name=name, showlegend=True, flatshading=False,
                                lighting=dict(ambient=0.45, diffuse=0.8, specular=0.2, roughness=0.6),
                                hoverinfo="name", **style[name]))
    axis = dict(visible=False)
    fig.update_layout(
        scene=dict(aspectmode="data", xaxis=axis, yaxis=axis, zaxis=axis,
                   # Looking from anterior (-y) toward +y with +z up puts +x (patient's left) on the viewer's right.
                   camera=dict(eye=dict(x=0.0, y=-1.9, z=0.25), up=dict(x=0, y=0, z=1))),
        margin=dict(l=0, r=0, t=0, b=0), paper_bgcolor="#111", legend=dict(font=dict(color="#ddd")), height=420,
    )
    return fig
