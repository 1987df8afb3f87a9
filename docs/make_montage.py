"""Make docs/phantom_montage.png: one phantom per CT-RATE abnormality (and one normal study), three planes each.

    .venv/bin/python docs/make_montage.py [--out docs/phantom_montage.png] [--shape 96,192,192]

Each tile group shows the axial, coronal and sagittal planes through the finding (the centre of the voxels that
change when the finding is drawn, found by rendering the same seed without it), at true physical aspect (square
pixels, via engine.viewing.plane_image), in the lung window for lung findings and the mediastinal window otherwise,
captioned with the label and the drawn finding's attributes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.labels import Finding  # noqa: E402
from engine.phantom import render_phantom  # noqa: E402
from engine.viewing import WINDOWS, plane_image  # noqa: E402

# One showcase finding (or a few) per label: moderate-to-severe so each is easy to see at a glance.
SHOWCASE: list[tuple[str, list[Finding]]] = [
    ("Normal", []),
    ("Medical material", [Finding("Medical material", side="left", kind="pacemaker"),
                          Finding("Medical material", kind="sternotomy wires")]),
    ("Arterial wall calcification", [Finding("Arterial wall calcification", severity="severe")]),
    ("Cardiomegaly", [Finding("Cardiomegaly", severity="moderate")]),
    ("Pericardial effusion", [Finding("Pericardial effusion", size_mm=15.0, severity="moderate")]),
    ("Coronary artery wall calcification", [Finding("Coronary artery wall calcification", severity="severe",
                                                    kind="three-vessel")]),
    ("Hiatal hernia", [Finding("Hiatal hernia", size_mm=50.0, severity="moderate")]),
    ("Lymphadenopathy", [Finding("Lymphadenopathy", size_mm=20.0, severity="moderate",
                                 stations=("subcarinal", "right paratracheal", "right hilar"))]),
    ("Emphysema", [Finding("Emphysema", side="bilateral", severity="severe", kind="centrilobular"),
                   Finding("Emphysema", side="right", severity="moderate", kind="bullous", size_mm=45.0)]),
    ("Atelectasis", [Finding("Atelectasis", side="right", lobe="right lower lobe", severity="severe",
                             kind="segmental")]),
    ("Lung nodule", [Finding("Lung nodule", side="right", lobe="right upper lobe", size_mm=16.0, kind="solid"),
                     Finding("Lung nodule", side="left", lobe="left upper lobe", size_mm=14.0, kind="ground-glass")]),
    ("Lung opacity", [Finding("Lung opacity", side="bilateral", severity="severe", kind="ground-glass")]),
    ("Pulmonary fibrotic sequela", [Finding("Pulmonary fibrotic sequela", side="right", lobe="right lower lobe",
                                            severity="severe")]),
    ("Pleural effusion", [Finding("Pleural effusion", side="right", size_mm=45.0, severity="severe")]),
    ("Mosaic attenuation pattern", [Finding("Mosaic attenuation pattern", side="bilateral", severity="severe")]),
    ("Peribronchial thickening", [Finding("Peribronchial thickening", side="bilateral", severity="severe")]),
    ("Consolidation", [Finding("Consolidation", side="right", lobe="right lower lobe", severity="severe")]),
    ("Bronchiectasis", [Finding("Bronchiectasis", side="left", lobe="left lower lobe", severity="severe",
                                kind="varicose"),
                        Finding("Bronchiectasis", side="right", lobe="right lower lobe", severity="moderate",
                                kind="cystic")]),
    ("Interlobular septal thickening", [Finding("Interlobular septal thickening", side="bilateral",
                                                severity="severe")]),
]
LUNG_LABELS = {"Emphysema", "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela",
               "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
               "Interlobular septal thickening", "Normal"}


def caption(title: str, findings: list[Finding]) -> str:
    parts = []
    for f in findings:
        bits = [b for b in (f.kind, f.lobe or f.side, f"{f.size_mm:g} mm" if f.size_mm else None, f.severity) if b]
        bits += list(f.stations)
        parts.append(", ".join(bits))
    return title + (": " + "; ".join(parts) if parts else " (no findings)")


def centre_of_change(with_f: np.ndarray, without: np.ndarray) -> tuple[int, int, int]:
    """(z, y, x) index through the drawn finding: the voxel of largest local change, refined to the centroid of
    the changed voxels around it."""
    diff = np.abs(with_f - without)
    if diff.max() < 1.0:
        z, y, x = diff.shape
        return z // 2, y // 2, x // 2
    changed = diff > 0.3 * diff.max() if diff.max() < 150 else diff > 100
    idx = np.argwhere(changed)
    z = int(np.median(idx[:, 0]))
    near = idx[np.abs(idx[:, 0] - z) <= 3]
    y, x = np.median(near[:, 1]), np.median(near[:, 2])
    return z, int(y), int(x)


def tile_group(title: str, findings: list[Finding], seed: int, shape) -> Image.Image:
    vol = render_phantom(findings, seed, shape_zyx=shape)
    if findings:
        clean = render_phantom(findings, seed, shape_zyx=shape, noise=False).array
        base = render_phantom([], seed, shape_zyx=shape, noise=False).array
        z, y, x = centre_of_change(clean, base)
    else:
        nz, ny, nx = vol.array.shape
        z, y, x = int(nz * 0.55), int(ny * 0.45), int(nx * 0.35)
    level, width = WINDOWS["lung" if title in LUNG_LABELS else "mediastinum"]
    tiles = [plane_image(vol, "axial", z, level, width), plane_image(vol, "coronal", y, level, width),
             plane_image(vol, "sagittal", x, level, width)]
    h = max(t.shape[0] for t in tiles)
    gap = 3
    w = sum(t.shape[1] for t in tiles) + gap * 2
    cap_h = 34
    img = Image.new("L", (w, h + cap_h), 0)
    ox = 0
    for t in tiles:
        img.paste(Image.fromarray(t), (ox, cap_h + (h - t.shape[0]) // 2))
        ox += t.shape[1] + gap
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    text = caption(title, findings)
    line1, line2 = text, ""
    if draw.textlength(text, font=font) > w - 8 and ": " in text:
        line1, line2 = text.split(": ", 1)
        line1 += ":"
    draw.text((4, 2), line1, fill=255, font=font)
    draw.text((4, 17), line2, fill=200, font=font)
    return img


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "phantom_montage.png"))
    parser.add_argument("--shape", default="96,192,192", help="render grid z,y,x (the montage uses a finer grid)")
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--only", default=None, help="comma-separated titles to render (for quick looks)")
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    rows = SHOWCASE if args.only is None else [r for r in SHOWCASE if r[0] in args.only.split(",")]
    groups = [tile_group(title, findings, 100 + i, shape) for i, (title, findings) in enumerate(rows)]
    cols = min(args.columns, len(groups))
    gw, gh = max(g.width for g in groups), max(g.height for g in groups)
    pad = 10
    n_rows = (len(groups) + cols - 1) // cols
    sheet = Image.new("L", (cols * (gw + pad) + pad, n_rows * (gh + pad) + pad), 30)
    for i, g in enumerate(groups):
        sheet.paste(g, (pad + (i % cols) * (gw + pad), pad + (i // cols) * (gh + pad)))
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out} ({sheet.width} x {sheet.height})")


if __name__ == "__main__":
    main()
