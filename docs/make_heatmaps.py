"""Make docs/heatmaps.png: where the shipped demo CT CLIP reads a finding, on held-out phantoms.

    .venv/bin/python docs/make_heatmaps.py [--checkpoint assets/ctclip] [--out docs/heatmaps.png]

For each showcased focal finding, the first held-out test study (seeds 900,000 + i, never trained on) that has it is
rendered on the demo grid; the heat map of the prompt "{label} is present." (CTClipPipeline.heatmap: each token's
exact share of the cosine score, positive part scaled to [0, 1]) is drawn over the axial and coronal planes through
the finding's centre, with the finding's true mask outlined (engine.phantom.finding_masks: the voxels
whose noise-free HU changes by >= 30 HU when that finding is left out). What the pointing game in metrics.json
counts, shown for three studies.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.phantom.render import finding_masks, make_study, study_findings  # noqa: E402
from engine.pipelines.ctclip import CTClipPipeline  # noqa: E402
from engine.viewing import WINDOWS, plane_image  # noqa: E402
from training.ctclip_data import TEST_SEED_BASE  # noqa: E402

SHOWCASE = (("Pleural effusion", "mediastinum"), ("Lymphadenopathy", "mediastinum"), ("Medical material", "bone"))


def first_study_with(label: str, start: int = 0, limit: int = 300) -> int:
    """The first test seed (TEST_SEED_BASE + i) whose sampled findings include `label`."""
    for i in range(start, limit):
        labels, _, _ = study_findings(TEST_SEED_BASE + i)
        if label in labels:
            return TEST_SEED_BASE + i
    raise SystemExit(f"no test study with {label} among the first {limit}")


def outline(mask2d: np.ndarray) -> np.ndarray:
    """The one-pixel border of a 2-D boolean mask."""
    return mask2d & ~ndimage.binary_erosion(mask2d)


def panel(volume, heat, mask, window: str, zoom: int = 2) -> list[np.ndarray]:
    """Axial and coronal planes through the centre of the finding's mask: the heat map over the CT with the true
    mask outlined in green, each enlarged `zoom` times."""
    z, y, x = (int(round(c)) for c in ndimage.center_of_mass(mask))
    level, width = WINDOWS[window]
    tiles = []
    for plane, index in (("axial", z), ("coronal", y)):
        rgb = plane_image(volume, plane, index, level, width, overlay=heat, overlay_alpha=0.6)
        edge = plane_image(replace(volume, array=mask.astype(np.float32)), plane, index, 0.5, 1.0) > 127
        rgb[outline(edge)] = (60, 255, 60)
        tiles.append(np.kron(rgb, np.ones((zoom, zoom, 1), dtype=np.uint8)))
    return tiles


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(ROOT / "assets" / "ctclip"))
    p.add_argument("--out", default=str(ROOT / "docs" / "heatmaps.png"))
    args = p.parse_args(argv)
    pipe = CTClipPipeline.from_pretrained(args.checkpoint)
    rows, captions = [], []
    for label, window in SHOWCASE:
        seed = first_study_with(label)
        study = make_study(seed)
        mask = finding_masks(seed, study.findings, labels=(label,))[label]
        heat, score = pipe.heatmap(study.volume, f"{label} is present.")
        rows.append(panel(study.volume, heat, mask, window))
        captions.append(f"{label}, held-out seed {seed}:\nheat map of \"{label} is present.\", true mask in green")
    h = max(t.shape[0] for r in rows for t in r)
    font = ImageFont.load_default()
    width = sum(t.shape[1] for t in rows[0]) + 6 * len(rows[0])
    canvas = Image.new("RGB", (width, len(rows) * (h + 34)), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for r, (tiles, caption) in enumerate(zip(rows, captions)):
        x0, y0 = 0, r * (h + 34)
        draw.text((4, y0 + 4), caption, fill=(255, 255, 255), font=font)
        for t in tiles:
            img = Image.fromarray(t if t.ndim == 3 else np.repeat(t[..., None], 3, -1))
            canvas.paste(img, (x0, y0 + 32))
            x0 += t.shape[1] + 6
    canvas.save(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
