"""Behaviour pinned before the structure refactor (issue 10): the shipped demo CT CLIP must give the same latents.

tests/data/pinned_ctclip_latents.npz was written by the code at c41d6dd (before the refactor) from the shipped
checkpoint: image latents of lung1 and five phantoms (fixed seeds and findings), three text latents and lung1's
zero-shot reading. A refactor that changes preprocessing, the model or the zero-shot rule fails here. When the shipped
checkpoint is retrained on purpose, this file is rewritten with it (and the commit says so):
`PYTHONPATH=. .venv/bin/python tests/test_pinned_behaviour.py --write` (the same latents these tests compute)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.labels import LABELS
from engine.phantom import render_phantom, sample_findings
from engine.volume import read_ct

PINNED = Path(__file__).parent / "data" / "pinned_ctclip_latents.npz"
PHANTOM_CASES = [((), 11), (("Pleural effusion",), 12), (("Cardiomegaly", "Emphysema"), 13), (("Lung nodule",), 14),
                 (("Medical material", "Consolidation"), 15)]
TEXTS = ["right pleural effusion and emphysema", "cardiomegaly", "Lung nodule is present."]


@pytest.fixture(scope="module")
def pipeline():
    from engine.pipelines.ctclip import CTClipPipeline

    return CTClipPipeline.from_pretrained()


def test_image_latents_are_unchanged(pipeline, lung1_path):
    pinned = np.load(PINNED)["image_latents"]
    latents = [pipeline.embed_volume(read_ct(lung1_path))]
    for labels, seed in PHANTOM_CASES:
        findings = sample_findings(list(labels), np.random.default_rng(seed))
        latents.append(pipeline.embed_volume(render_phantom(findings, seed)))
    np.testing.assert_allclose(np.stack(latents), pinned, atol=1e-5, rtol=0)


def test_text_latents_and_zero_shot_are_unchanged(pipeline, lung1_path):
    pinned = np.load(PINNED)
    np.testing.assert_allclose(pipeline.embed_texts(TEXTS), pinned["text_latents"], atol=1e-5, rtol=0)
    reading = pipeline.zero_shot(read_ct(lung1_path))
    np.testing.assert_allclose([reading[label] for label in LABELS], pinned["lung1_zero_shot"], atol=1e-5, rtol=0)


def pinned_values(pipeline, lung1: Path) -> dict[str, np.ndarray]:
    """What the tests above compare against, computed by the shipped checkpoint (for --write)."""
    latents = [pipeline.embed_volume(read_ct(lung1))]
    for labels, seed in PHANTOM_CASES:
        latents.append(pipeline.embed_volume(render_phantom(sample_findings(list(labels), np.random.default_rng(seed)),
                                                            seed)))
    reading = pipeline.zero_shot(read_ct(lung1))
    return {"image_latents": np.stack(latents), "text_latents": pipeline.embed_texts(TEXTS),
            "lung1_zero_shot": np.array([reading[label] for label in LABELS])}


if __name__ == "__main__":
    import sys

    from engine.pipelines.ctclip import CTClipPipeline
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: tests/test_pinned_behaviour.py --write  (after retraining assets/ctclip on purpose)")
    values = pinned_values(CTClipPipeline.from_pretrained(), Path(__file__).resolve().parents[2] / "shared" / "data"
                           / "ct" / "lung1_image.nii.gz")
    np.savez(PINNED, **values)
    print(f"wrote {PINNED}")
