"""The CT viewer: three orthogonal planes with slice sliders, window presets, an info line and an on-demand 3-D view.

`ct_viewer()` builds the viewer inside whatever Blocks context it is called from (any tab) and returns a `CTViewer`
holding its components. A tab opens a volume in it by writing the Volume to `viewer.volume` (a server-side gr.State)
and chaining `viewer.refresh` after that event:

    dep = button.click(load_something, inputs, [viewer.volume, other_outputs])
    viewer.open_after(dep)

and shows a heat map by writing `viewer.overlay` and chaining `viewer.redraw_after` (the planes redraw in place).

Every tab has its own viewer; "the CT in the viewer" for another tab (the Chest X-ray tab simulates a radiograph from
it) is the one most recently opened in any of them, per browser: ui.py passes each tab's viewer to
`follow_open_study(viewers, current)`, which copies every volume a viewer opens into the shared gr.State `current`.

Images come from engine.viewing.plane_image (true physical aspect, radiological orientation). An optional heat map
(`viewer.overlay`, a float array 0..1 the shape of the volume, or None) is blended over every plane.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import gradio as gr
import numpy as np

from engine.viewing import PLANES, WINDOWS, figure_3d, plane_count, plane_image

PRESETS = {"Lung": WINDOWS["lung"], "Mediastinum": WINDOWS["mediastinum"], "Bone": WINDOWS["bone"]}
CUSTOM = "Custom"
DEFAULT_PRESET = "Lung"
PLANE_TITLES = {"axial": "Axial", "coronal": "Coronal", "sagittal": "Sagittal"}
IMAGE_HEIGHT = 360  # px on screen; the image keeps its own (physical) aspect inside this box
NO_VOLUME = "No CT loaded yet: pick a study or upload a file."


@dataclass
class CTViewer:
    """The viewer's components (see the module docstring for how a tab opens a volume)."""
    volume: gr.State            # engine.volume.Volume | None (server side)
    overlay: gr.State           # float array (z, y, x) in 0..1 | None
    images: list[gr.Image]      # axial, coronal, sagittal
    sliders: list[gr.Slider]    # one slice index per plane
    preset: gr.Radio
    level: gr.Slider            # HU
    width: gr.Slider            # HU
    info: gr.Markdown
    show_3d: gr.Button
    plot: gr.Plot
    opened: list = field(default_factory=list)   # the events (open_after) that showed a new volume


    @property
    def refresh_inputs(self) -> list:
        return [self.volume, self.overlay, self.level, self.width]

    @property
    def refresh_outputs(self) -> list:
        return [*self.sliders, *self.images, self.info, self.plot]

    def open_after(self, dependency):
        """Show `viewer.volume` once `dependency` (an event that wrote it) has succeeded."""
        shown = dependency.success(refresh, self.refresh_inputs, self.refresh_outputs, show_progress="hidden")
        self.opened.append(shown)
        return shown

    def redraw_after(self, dependency):
        """Redraw the three planes at their current slices once `dependency` (an event that wrote `viewer.overlay`,
        e.g. a heat map or None) has succeeded."""
        return dependency.success(_render_all, [self.volume, self.overlay, *self.sliders, self.level, self.width],
                                  self.images, show_progress="hidden")


def follow_open_study(viewers, current: gr.State) -> None:
    """After any of `viewers` (None entries skipped) shows a new volume, copy it into `current` (a gr.State shared by
    the tabs: the CT most recently opened in this browser). Call once every tab is built."""
    for viewer in viewers:
        for shown in (viewer.opened if viewer is not None else []):
            shown.success(lambda volume: volume, viewer.volume, current, show_progress="hidden")


# --------------------------------------------------------------------------------------------------- handlers

def _overlay_for(volume, overlay):
    """The overlay if it fits the volume, else None (a stale overlay from a previous volume is ignored)."""
    if overlay is None or volume is None:
        return None
    return overlay if np.shape(overlay) == volume.array.shape else None


def render_plane(volume, overlay, plane: str, index, level, width):
    """One plane image (uint8) or None when nothing is loaded."""
    if volume is None:
        return None
    return plane_image(volume, plane, int(index), float(level), float(width), overlay=_overlay_for(volume, overlay))


def info_line(volume) -> str:
    """Shape (x, y, z), spacing mm, HU range and source of a volume, as one Markdown line (+ warnings)."""
    if volume is None:
        return NO_VOLUME
    x, y, z = volume.shape_xyz
    spacing = " x ".join(f"{round(float(s), 2)}" for s in volume.spacing)
    lo, hi = float(volume.array.min()), float(volume.array.max())
    source = volume.source or "unknown"
    if os.sep in source:
        source = os.path.basename(source)
    line = (f"**{x} x {y} x {z}** voxels (x, y, z) · spacing {spacing} mm · HU {lo:.0f} to {hi:.0f} · "
            f"source: {source}")
    for warning in volume.warnings:
        line += f"  \n⚠ {warning}"
    return line


def refresh(volume, overlay, level, width):
    """New volume: re-range the three sliders to it (middle slice), draw the planes, describe it, clear the 3-D."""
    if volume is None:
        sliders = [gr.Slider(minimum=0, maximum=1, value=0) for _ in PLANES]
        return [*sliders, None, None, None, NO_VOLUME, gr.Plot(value=None, visible=False)]
    sliders, images = [], []
    for plane in PLANES:
        n = plane_count(volume, plane)
        middle = n // 2
        # a single-slice plane (one DICOM slice) still needs maximum > minimum; plane_image clips the index
        sliders.append(gr.Slider(minimum=0, maximum=max(n - 1, 1), value=middle, step=1, interactive=n > 1))
        images.append(render_plane(volume, overlay, plane, middle, level, width))
    return [*sliders, *images, info_line(volume), gr.Plot(value=None, visible=False)]


def _render_all(volume, overlay, k, j, i, level, width):
    return [render_plane(volume, overlay, plane, index, level, width) for plane, index in zip(PLANES, (k, j, i))]


def on_preset(name, volume, overlay, k, j, i, level, width):
    """A window preset: move the level/width sliders to it and redraw (Custom keeps the sliders as they are)."""
    if name in PRESETS:
        level, width = PRESETS[name]
    return [level, width, *_render_all(volume, overlay, k, j, i, level, width)]


def on_window_slider(volume, overlay, k, j, i, level, width):
    """The user moved level or width: the preset becomes Custom (unless it matches one) and the planes redraw."""
    name = next((n for n, lw in PRESETS.items() if lw == (float(level), float(width))), CUSTOM)
    return [name, *_render_all(volume, overlay, k, j, i, level, width)]


def on_show_3d(volume):
    if volume is None:
        gr.Warning("Open a CT first, then press Show 3-D.")
        return gr.Plot(visible=False)
    return gr.Plot(value=figure_3d(volume), visible=True)


# --------------------------------------------------------------------------------------------------- layout

def ct_viewer() -> CTViewer:
    """Build the viewer in the current Blocks context and wire its own events; returns its components."""
    volume = gr.State(None)
    overlay = gr.State(None)
    info = gr.Markdown(NO_VOLUME, elem_classes=["ct-info"])
    images, sliders = [], []
    with gr.Row(equal_height=True):
        for plane in PLANES:
            with gr.Column(min_width=220):
                images.append(gr.Image(label=PLANE_TITLES[plane], type="numpy", format="png", interactive=False,
                                       height=IMAGE_HEIGHT, buttons=["fullscreen"],
                                       elem_classes=["ct-plane", f"ct-{plane}"]))
                sliders.append(gr.Slider(0, 1, value=0, step=1, label=f"{PLANE_TITLES[plane]} slice",
                                         elem_classes=[f"ct-slider-{plane}"]))
    with gr.Row(equal_height=False):
        preset = gr.Radio([*PRESETS, CUSTOM], value=DEFAULT_PRESET, label="Window", scale=3, min_width=330,
                          elem_classes=["ct-preset"])
        level = gr.Slider(-1200, 3000, value=PRESETS[DEFAULT_PRESET][0], step=10, label="Level (HU)", scale=2,
                          elem_classes=["ct-level"])
        width = gr.Slider(1, 4000, value=PRESETS[DEFAULT_PRESET][1], step=10, label="Width (HU)", scale=2,
                          elem_classes=["ct-width"])
        show_3d = gr.Button("Show 3-D", variant="secondary", scale=1, min_width=110, elem_classes=["ct-show-3d"])
    # Hidden until asked for: the surface mesh takes about a second, so it is not computed on every load.
    plot = gr.Plot(label="3-D: bone and lungs (drag to rotate)", visible=False, elem_classes=["ct-plot"])
    viewer = CTViewer(volume=volume, overlay=overlay, images=images, sliders=sliders, preset=preset, level=level,
                      width=width, info=info, show_3d=show_3d, plot=plot)

    quick = dict(show_progress="hidden", trigger_mode="always_last")
    for plane, slider, image in zip(PLANES, sliders, images):
        slider.input(lambda v, o, idx, lv, wd, plane=plane: render_plane(v, o, plane, idx, lv, wd),
                     [volume, overlay, slider, level, width], image, **quick)
    window_inputs = [volume, overlay, *sliders, level, width]
    preset.input(on_preset, [preset, *window_inputs], [level, width, *images], **quick)
    for slider in (level, width):
        slider.input(on_window_slider, window_inputs, [preset, *images], **quick)
    show_3d.click(on_show_3d, volume, plot)
    return viewer


# ------------------------------------------------------------------------------------------- two volumes side by side

@dataclass
class ComparisonViewer:
    """Two volumes of one grid side by side at the same slice, and the second again with a heat map over it (e.g. a
    volume generated without and with a finding, and |difference|). A tab writes a `Comparison` to `pair` and
    chains `open_after`."""
    pair: gr.State              # Comparison | None (server side)
    plane: gr.Radio             # axial / coronal / sagittal
    slider: gr.Slider           # the slice index, shared by the three images
    preset: gr.Radio            # window preset
    images: list[gr.Image]      # first, second, second + overlay

    def open_after(self, dependency):
        return dependency.success(refresh_comparison, [self.pair, self.plane, self.preset],
                                  [self.slider, *self.images], show_progress="hidden")


@dataclass
class Comparison:
    """What a ComparisonViewer shows: two volumes of the same shape, their titles, and the heat map (z, y, x) in
    0..1 drawn over the second in the third image."""
    first: object               # engine.volume.Volume
    second: object
    titles: tuple[str, str, str]
    overlay: np.ndarray


def render_comparison(pair, plane: str, index, preset: str) -> list:
    """The three images at one slice (None for each when nothing is loaded)."""
    if pair is None:
        return [None, None, None]
    level, width = PRESETS.get(preset, PRESETS[DEFAULT_PRESET])
    plane = plane.lower()
    return [plane_image(pair.first, plane, int(index), level, width),
            plane_image(pair.second, plane, int(index), level, width),
            plane_image(pair.second, plane, int(index), level, width, overlay=pair.overlay, overlay_alpha=0.8)]


def refresh_comparison(pair, plane: str, preset: str) -> list:
    """A new pair or another plane: the slider re-ranged to the plane (middle slice), the images drawn and titled."""
    if pair is None:
        return [gr.Slider(minimum=0, maximum=1, value=0), None, None, None]
    n = plane_count(pair.first, plane.lower())
    images = render_comparison(pair, plane, n // 2, preset)
    return [gr.Slider(minimum=0, maximum=max(n - 1, 1), value=n // 2, step=1, interactive=n > 1),
            *[gr.Image(value=image, label=title) for image, title in zip(images, pair.titles)]]


def comparison_viewer(elem_id: str = "ct-compare", titles: tuple[str, str, str] = ("First", "Second",
                                                                                  "Second with the overlay")
                      ) -> ComparisonViewer:
    """Build the side-by-side viewer in the current Blocks context (`titles` until a pair is shown) and wire its own
    events."""
    pair = gr.State(None)
    with gr.Row(equal_height=False):
        plane = gr.Radio([PLANE_TITLES[p] for p in PLANES], value=PLANE_TITLES["axial"], label="Plane", scale=2,
                         elem_classes=[f"{elem_id}-plane"])
        preset = gr.Radio(list(PRESETS), value=DEFAULT_PRESET, label="Window", scale=2,
                          elem_classes=[f"{elem_id}-preset"])
        slider = gr.Slider(0, 1, value=0, step=1, label="Slice (the same in the three images)", scale=3,
                           elem_classes=[f"{elem_id}-slider"])
    images = []
    with gr.Row(equal_height=True):
        for k in range(3):
            images.append(gr.Image(label=titles[k], type="numpy", format="png", interactive=False, height=IMAGE_HEIGHT,
                                   buttons=["fullscreen"], elem_classes=["ct-plane", f"{elem_id}-{k}"]))
    viewer = ComparisonViewer(pair=pair, plane=plane, slider=slider, preset=preset, images=images)
    quick = dict(show_progress="hidden", trigger_mode="always_last")
    slider.input(render_comparison, [pair, plane, slider, preset], images, **quick)
    preset.input(render_comparison, [pair, plane, slider, preset], images, **quick)
    plane.input(refresh_comparison, [pair, plane, preset], [slider, *images], **quick)
    return viewer
