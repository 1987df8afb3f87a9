"""Make docs/lymph_nodes_demo_grid.png: what an enlarged lymph node looks like on the demo grid.

    .venv/bin/python docs/make_node_picture.py [--out docs/lymph_nodes_demo_grid.png]

Evidence for issue 12's lymphadenopathy reading (docs/training.md, stage 5), not part of any model. For four node
stations, one phantom (seeds 5,000,001+, outside every split) is rendered on the demo grid (64 x 128 x 128 voxels,
2.73 x 2.73 x 4.69 mm) with one moderate Lymphadenopathy finding at that station and without it (same seed, so the
same anatomy and noise). Each row: the axial slice through the most changed plane, with the node, without it, and
without it with the drawn node outlined in red (the voxels whose noise-free HU changes by >= 30 HU, as
engine.phantom.finding_masks defines the mask); mediastinal window (level 40, width 400 HU).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.labels import Finding  # noqa: E402
from engine.phantom.render import render_phantom  # noqa: E402
from engine.viewing import WINDOWS, plane_image  # noqa: E402

# (seed, station, short axis mm): moderate nodes are 14-20 mm (engine/phantom/findings.py), 22 mm is a large one
ROWS = ((5_000_001, "right paratracheal", 14.0), (5_000_002, "subcarinal", 18.0),
        (5_000_003, "prevascular", 14.0), (5_000_004, "left hilar", 22.0))
CROP_YX = (slice(16, 104), slice(16, 112))     # the chest without the outer body wall, in voxels (y, x)
ZOOM = 3


def row_images(seed: int, station: str, size_mm: float) -> tuple[list[np.ndarray], str]:
    """Three RGB panels (with, without, without + outline) and the row's caption."""
    node = [Finding("Lymphadenopathy", size_mm=size_mm, severity="moderate", stations=(station,))]
    drawn = np.abs(render_phantom(node, seed, noise=False).array - render_phantom([], seed, noise=False).array) >= 30
    z = int(np.argmax(drawn.sum(axis=(1, 2))))
    level, width = WINDOWS["mediastinum"]
    panels = [plane_image(render_phantom(findings, seed), "axial", z, level, width) for findings in (node, [])]
    panels = [np.stack([p] * 3, -1) if p.ndim == 2 else p[..., :3].copy() for p in panels]
    outlined = panels[1].copy()
    edge = drawn[z] & ~ndimage.binary_erosion(drawn[z])
    outlined[edge] = (255, 40, 40)
    crops = [p[CROP_YX].repeat(ZOOM, 0).repeat(ZOOM, 1) for p in (*panels, outlined)]
    caption = f"{station}, short axis {size_mm:.0f} mm: {int(drawn.sum())} voxels changed, slice {z}"
    return crops, caption


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "lymph_nodes_demo_grid.png")
    args = parser.parse_args()
    font = ImageFont.load_default()
    rows = [row_images(*row) for row in ROWS]
    h, w = rows[0][0][0].shape[:2]
    gap, head = 6, 16
    sheet = Image.new("RGB", (3 * w + 2 * gap, head + len(rows) * (h + head + gap)), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for k, title in enumerate(("with the node", "without it (same seed)", "without it, the node outlined")):
        draw.text((k * (w + gap) + 4, 2), title, fill=(255, 255, 255), font=font)
    for r, (panels, caption) in enumerate(rows):
        y0 = head + r * (h + head + gap)
        draw.text((4, y0 + 2), caption, fill=(255, 255, 255), font=font)
        for k, panel in enumerate(panels):
            sheet.paste(Image.fromarray(panel), (k * (w + gap), y0 + head))
    sheet.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
