"""Latency of one demo generation on this machine (CPU): seconds per sampling step, decode time, the batched-guidance
speed-up against two separate U-Net passes, the total at the default steps, and peak memory.

    targets (issue 15): one demo generation at default steps <= 20 s on 2 cores, peak memory <= 4 GB

Run on an otherwise idle machine: .venv/bin/python bench/bench_generate.py [--steps N] [--repeats R]
(uses assets/generator and assets/ctclip; without a trained generator it times untrained demo-sized models, which
cost the same)
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.models.diffusion_unet import DiffusionUNet, DiffusionUNetConfig  # noqa: E402
from engine.models.vae import CTAutoencoder, VAEConfig  # noqa: E402
from engine.pipelines.generate import GeneratePipeline, guided_prediction  # noqa: E402
from engine.settings import generator_dir  # noqa: E402

PROMPT = ("Findings: Moderate right pleural effusion with adjacent atelectasis. The heart is enlarged. "
          "Impression: Right pleural effusion. Cardiomegaly.")


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load() -> GeneratePipeline:
    if (generator_dir() / "unet" / "config.json").is_file():
        return GeneratePipeline.from_pretrained()
    print("(no trained generator in assets/generator: timing untrained demo-sized models)")
    unet_config = DiffusionUNetConfig.demo()

    def encode(texts):
        return np.full((len(texts), unet_config.context_dim), unet_config.context_dim ** -0.5, np.float32)
    return GeneratePipeline(CTAutoencoder(VAEConfig.demo()), DiffusionUNet(unet_config), encode)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    start = time.perf_counter()
    pipeline = load()
    config = pipeline.config
    steps = args.steps or config.default_steps
    print(f"load: {time.perf_counter() - start:.2f} s, threads {torch.get_num_threads()}, latent {config.latent_shape}")
    latent = torch.randn(1, *config.latent_shape)
    context = torch.nn.functional.normalize(torch.randn(1, 1, config.context_dim), dim=-1)
    t = torch.tensor(500.0)
    with torch.inference_mode():
        batched = median_time(lambda: guided_prediction(pipeline.unet, latent, t, context, 5.0), args.repeats)
        separate = median_time(lambda: guided_prediction(pipeline.unet, latent, t, context, 5.0, batched=False),
                               args.repeats)
        decode = median_time(lambda: pipeline.decode(latent), args.repeats)
    print(f"sampling step (guidance batched, batch 2): {batched:.3f} s")
    print(f"sampling step (two separate passes):       {separate:.3f} s -> batched speed-up x{separate / batched:.2f}")
    print(f"decode {tuple(config.latent_shape)} -> volume: {decode:.2f} s")
    total = median_time(lambda: pipeline.generate(PROMPT, steps=steps, seed=0), max(1, args.repeats - 1))
    print(f"one generation at {steps} steps: {total:.2f} s (target <= 20 s)")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (max RSS): {peak_mb:.0f} MB (target <= 4096 MB)")


if __name__ == "__main__":
    main()
