"""Benchmark of the DRR: a PA radiograph of lung1 at full resolution (NIfTI, 512 x 512 x 48, 0.57 x 0.57 x 5 mm) ->
421 x 512 square pixels of 0.57 mm. The CT is read once, outside the timing.

Prints the median of 5 runs (clean DRR, and with a random augmentation) and the peak memory: the process' peak
resident set (ru_maxrss; torch's buffers are not seen by tracemalloc). Target: <= 1 s on the 2-core CPU.
    python bench/bench_drr.py [--runs 5] [--ct PATH]
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.drr import DRRAugmentation, simulate_radiograph  # noqa: E402
from engine.settings import shared_data  # noqa: E402
from engine.volume import read_ct  # noqa: E402

TARGET_S = 1.0


def median_seconds(function, runs: int) -> float:
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ct", default=str(shared_data() / "ct" / "lung1_image.nii.gz"))
    args = parser.parse_args()
    volume = read_ct(args.ct)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    augmentation = DRRAugmentation.sample(np.random.default_rng(0))
    clean = median_seconds(lambda: simulate_radiograph(volume), args.runs)
    augmented = median_seconds(lambda: simulate_radiograph(volume, augmentation=augmentation, seed=0), args.runs)
    shape = simulate_radiograph(volume).image.shape
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"CT {volume.array.shape} (z, y, x), spacing {tuple(round(s, 3) for s in volume.spacing)} mm -> DRR {shape}")
    print(f"DRR clean      median of {args.runs}: {clean:.3f} s (target <= {TARGET_S} s)")
    print(f"DRR augmented  median of {args.runs}: {augmented:.3f} s")
    print(f"peak resident memory: {peak:.0f} MB (after reading the CT: {rss_before:.0f} MB)")


if __name__ == "__main__":
    main()
