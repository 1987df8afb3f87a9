"""Make docs/generation_montage.png: volumes the shipped demo generator makes from held-out reports, next to the
real phantoms those reports describe.

    .venv/bin/python docs/make_generation_montage.py [--generator assets/generator] [--out docs/generation_montage.png]

Rows: the first held-out test studies (seeds 900,000 + i, never trained on) that show each showcased finding; columns:
the real phantom (axial, coronal) and the volume generated from its report (guidance 5, the U-Net's default steps,
seed 0), each on the lung window (level -600, width 1500 HU) through the volume's centre. Labels under each row say
what the report asks for and what the demo CT CLIP reads in the generated volume (zero-shot probability of the
showcased finding).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.phantom.render import make_study, study_findings  # noqa: E402
from engine.pipelines.generate import GeneratePipeline  # noqa: E402
from engine.viewing import WINDOWS, plane_image  # noqa: E402
from training.ctclip_data import TEST_SEED_BASE  # noqa: E402

SHOWCASE = ("Pleural effusion", "Cardiomegaly", "Emphysema", "Consolidation")


def first_study_with(label: str, taken: set[int], limit: int = 300) -> int:
    """The first test seed not yet shown whose sampled findings include `label`."""
    for i in range(limit):
        seed = TEST_SEED_BASE + i
        if seed not in taken and label in study_findings(seed)[0]:
            return seed
    raise SystemExit(f"no test study with {label} among the first {limit}")


def planes(volume, zoom: int = 2) -> list[np.ndarray]:
    """Axial and coronal planes through the centre on the lung window, enlarged `zoom` times."""
    level, width = WINDOWS["lung"]
    z, y, _ = volume.array.shape
    tiles = []
    for plane, index in (("axial", z // 2), ("coronal", y // 2)):
        grey = plane_image(volume, plane, index, level, width)          # (rows, columns) uint8
        rgb = np.repeat(grey[..., None], 3, axis=2) if grey.ndim == 2 else grey
        tiles.append(np.kron(rgb, np.ones((zoom, zoom, 1), dtype=np.uint8)))
    return tiles


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--generator", default=str(ROOT / "assets" / "generator"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "generation_montage.png"))
    args = parser.parse_args(argv)
    pipeline = GeneratePipeline.from_pretrained(args.generator)
    rows, captions, taken = [], [], set()
    for label in SHOWCASE:
        seed = first_study_with(label, taken)
        taken.add(seed)
        study = make_study(seed)
        generated = pipeline.generate(study.report.text, seed=0).volume
        read = pipeline.reader.zero_shot(generated)[label]
        tiles = planes(study.volume) + planes(generated)
        height = max(t.shape[0] for t in tiles)
        tiles = [np.pad(t, ((0, height - t.shape[0]), (0, 4), (0, 0))) for t in tiles]
        rows.append(np.concatenate(tiles, axis=1))
        captions.append(f"{label} asked (seed {seed}); the CT CLIP reads P = {read:.2f} in the generated volume")
    width = max(r.shape[1] for r in rows)
    canvas = Image.new("RGB", (width, sum(r.shape[0] + 18 for r in rows) + 18), "black")
    draw, y = ImageDraw.Draw(canvas), 2
    draw.text((4, y), "real phantom (axial, coronal)  |  SYNTHETIC, generated from its report (axial, coronal)",
              fill="white")
    y += 16
    for row, caption in zip(rows, captions):
        canvas.paste(Image.fromarray(row), (0, y))
        draw.text((4, y + row.shape[0] + 2), caption, fill="white")
        y += row.shape[0] + 18
    canvas.save(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
