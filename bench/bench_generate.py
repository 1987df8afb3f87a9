"""Latency and memory of the demo generator (Text2CT) on this machine's CPU, on the trained generator in
assets/generator (or $CT_GENERATOR_DIR) conditioned on the shipped CT CLIP:

    one generation at the default steps     median of --repeats runs (text, sampling, decoding split out)
    seconds per sampling step               the median generation's sampling time / steps (one guided U-Net call each)
    decode time                             the median generation's VAE decoding time
    batched guidance                        one guided step as ONE U-Net call on [cond, uncond] against two separate
                                            calls (median of --repeats each): the speed-up of batching
    peak memory                             the process's maximum resident set size (loading included)

    targets (issue 15): one demo generation at default steps <= 20 s on 2 cores, peak memory <= 4 GB

Run on an otherwise idle machine: .venv/bin/python bench/bench_generate.py [--steps N] [--repeats R]
Without a trained generator it says so in one sentence and times nothing (untrained weights cost the same, but a
number printed here should be the shipped model's).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.pipelines.generate import DEFAULT_GUIDANCE, GeneratePipeline, guided_prediction  # noqa: E402
from engine.settings import generator_dir  # noqa: E402
from timing import median_seconds, peak_rss_mb  # noqa: E402  (bench/timing.py)

PROMPT = ("Findings: Moderate right pleural effusion with adjacent atelectasis. The heart is enlarged. "
          "Impression: Right pleural effusion. Cardiomegaly.")
TARGET_S, TARGET_MB = 20.0, 4096


def time_generations(pipeline: GeneratePipeline, steps: int, repeats: int) -> dict:
    """Median total of `repeats` generations at `steps` steps, and that run's text / sampling / decoding seconds."""
    runs = []
    for seed in range(repeats):
        start = time.perf_counter()
        result = pipeline.generate(PROMPT, steps=steps, seed=seed)
        runs.append((time.perf_counter() - start, result.timings_s))
    runs.sort(key=lambda run: run[0])
    total, timings = runs[len(runs) // 2]
    return {"total": total, "all": [run[0] for run in runs], **timings}


def time_guidance(pipeline: GeneratePipeline, repeats: int) -> tuple[float, float]:
    """(seconds of one guided step batched, seconds as two separate U-Net passes) at a mid-trajectory timestep."""
    config = pipeline.config
    latent = torch.randn(1, *config.latent_shape, generator=torch.Generator().manual_seed(0))
    context = torch.nn.functional.normalize(torch.randn(1, 1, config.context_dim), dim=-1)
    t = torch.tensor(config.num_train_timesteps / 2)
    with torch.inference_mode():
        # median_seconds warms each form up first (allocations, kernels)
        batched = median_seconds(lambda: guided_prediction(pipeline.unet, latent, t, context, DEFAULT_GUIDANCE),
                                 repeats)
        separate = median_seconds(lambda: guided_prediction(pipeline.unet, latent, t, context, DEFAULT_GUIDANCE,
                                                            batched=False), repeats)
    return batched, separate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (the median is printed)")
    args = parser.parse_args()
    folder = generator_dir()
    if not (folder / "unet" / "config.json").is_file():
        print(f"No trained generator in {folder} (train one with `python -m training vae --preset demo`, then "
              "`ldm` and `ldm-export`), so nothing was timed.")
        return
    start = time.perf_counter()
    pipeline = GeneratePipeline.from_pretrained(folder)
    config = pipeline.config
    steps = args.steps or config.default_steps
    print(f"generator {folder} ({pipeline.model_id}): latent {tuple(config.latent_shape)}, loaded in "
          f"{time.perf_counter() - start:.1f} s; {torch.get_num_threads()} threads")
    pipeline.generate(PROMPT, steps=1, seed=0)  # warm-up: first-call allocations are not part of a generation
    run = time_generations(pipeline, steps, max(1, args.repeats))
    spread = ", ".join(f"{t:.2f}" for t in run["all"])
    print(f"one generation at {steps} steps: {run['total']:.2f} s median of {len(run['all'])} ({spread} s); "
          f"target <= {TARGET_S:g} s")
    print(f"  text {run['text']:.3f} s, sampling {run['sampling']:.2f} s, decoding {run['decoding']:.2f} s")
    print(f"seconds per sampling step: {run['sampling'] / steps:.3f} s (one guided U-Net call on a batch of 2)")
    print(f"decode time: {run['decoding']:.2f} s")
    batched, separate = time_guidance(pipeline, max(1, args.repeats))
    print(f"guided step: {batched:.3f} s batched, {separate:.3f} s as two passes -> batched guidance speed-up "
          f"x{separate / batched:.2f}")
    peak_mb = peak_rss_mb()
    print(f"peak memory (max RSS, loading included): {peak_mb:.0f} MB; target <= {TARGET_MB} MB")


if __name__ == "__main__":
    main()
