"""Evaluation of the generator (skeleton: the metric code and the protocol, not yet a shipped metrics.json).

    python -m training.eval_generate [--generator assets/generator] [--n 40] [--steps N] [--out FILE]

What it measures, on held-out phantom studies (test seeds, training/ctclip_data.py TEST_SEED_BASE, never trained
on), each generated from ITS report with a fixed seed:
- factual correctness (Text2CT's "CT-Net AUC", here with the demo CT CLIP as the reader): the CT CLIP's zero-shot
  probabilities on the GENERATED volumes scored against the reports' labels (macro AUROC, training/evaluate.py's
  zero_shot_metrics), next to the same on the REAL phantoms of those reports. Demo target: generated >= 0.9 x real
  (the paper: 0.745 vs 0.751).
- FID 3-D: Frechet distance (MONAI's get_fid_score) between the feature sets of generated and real volumes.
  Feature extractor, documented choice: the demo CT CLIP's unit image latent (256-d; engine.pipelines.ctclip
  embed_volume). Text2CT/MAISI use a RadImageNet ResNet-50 (2.5-D, per plane) and MedicalNet (3-D); those weights
  are not available offline, so the numbers are comparable between our runs, NOT with the paper's.
- FID 2.5-D (axial, coronal, sagittal): NOT implemented yet - it needs a 2-D medical feature extractor (RadImageNet)
  this offline project does not have; the function raises with that sentence.
- guidance sweep: factual correctness for guidance in 0..10 (`guidance_sweep`).
Not done yet: the ablation "text encoder not aligned with CT" (condition on raw MiniLM features instead of the CT
CLIP's latent: needs a second LDM run) and the montage of generated vs real for the README.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from engine.labels import LABELS


def fid_3d(generated_features: np.ndarray, real_features: np.ndarray) -> float:
    """Frechet distance between two (N, D) feature sets (MONAI's get_fid_score: means and covariances)."""
    from monai.metrics.fid import get_fid_score

    return float(get_fid_score(torch.as_tensor(generated_features, dtype=torch.float64),
                               torch.as_tensor(real_features, dtype=torch.float64)))


def fid_2_5d(*_args, **_kwargs) -> dict:
    raise NotImplementedError("FID 2.5-D needs a 2-D medical feature extractor (RadImageNet ResNet-50) that is not "
                              "available offline; it is not implemented yet.")


def factual_correctness(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    """Zero-shot metrics (AUROC per label and macro) of the CT CLIP's reading (N, 18) against labels (N, 18)."""
    from training.evaluate import zero_shot_metrics

    return zero_shot_metrics(probabilities, labels, LABELS)


def held_out_studies(n: int):
    """The first n held-out test phantoms (volume, report, labels), seeds TEST_SEED_BASE + i."""
    from engine.phantom import make_study
    from training.ctclip_data import TEST_SEED_BASE

    return [make_study(TEST_SEED_BASE + i) for i in range(n)]


def evaluate(generator_dir: Path | None, n: int, steps: int | None, guidance: float, seed: int = 0) -> dict:
    """Generate one volume per held-out report and score it against the real phantom of that report."""
    from engine.pipelines.generate import GeneratePipeline

    pipeline = GeneratePipeline.from_pretrained(generator_dir)
    reader = pipeline.reader
    studies = held_out_studies(n)
    real_p, gen_p, real_f, gen_f, labels = [], [], [], [], []
    for i, study in enumerate(studies):  # one generation per held-out report, seed + i
        generated = pipeline.generate(study.report.text, steps=steps, guidance=guidance, seed=seed + i).volume
        for volume, probs, feats in ((study.volume, real_p, real_f), (generated, gen_p, gen_f)):
            latent = reader.embed_volume(volume)
            feats.append(latent)
            reading = reader.zero_shot_from_latent(latent)
            probs.append([reading[label] for label in LABELS])
        labels.append([int(label in study.labels) for label in LABELS])
    labels = np.array(labels)
    real = factual_correctness(np.array(real_p), labels)
    generated = factual_correctness(np.array(gen_p), labels)
    return {"n": n, "guidance": guidance, "steps": steps or pipeline.config.default_steps,
            "factual_correctness_macro_auroc": {"generated": generated["macro"]["auroc"],
                                                "real": real["macro"]["auroc"]},
            "fid_3d_ctclip_latent": fid_3d(np.array(gen_f), np.array(real_f))}


def guidance_sweep(generator_dir: Path | None, n: int, steps: int | None,
                   scales=(0.0, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0)) -> list[dict]:
    """Factual correctness and FID at each guidance scale (Text2CT's sweep: precision peaks near 5)."""
    return [evaluate(generator_dir, n, steps, w) for w in scales]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.eval_generate")
    parser.add_argument("--generator", default=None, help="generator folder (default assets/generator)")
    parser.add_argument("--n", type=int, default=40, help="held-out reports to generate from")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--sweep", action="store_true", help="guidance 0..10 instead of one scale")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    directory = Path(args.generator) if args.generator else None
    result = (guidance_sweep(directory, args.n, args.steps) if args.sweep
              else evaluate(directory, args.n, args.steps, args.guidance))
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
