"""Benchmark the phantom: render_phantom latency (median of several seeds and runs) and peak memory.

    .venv/bin/python bench/bench_phantom.py [--shape 64,128,128] [--seeds 6] [--runs 3]

Three workloads on the given grid: a normal study, a label set drawn from CT-RATE's table (the training
distribution), and all 18 findings at once (the worst case). Per-seed anatomy (lung trees) is cached after the first
render of a seed; the "cold" column includes building it. Peak memory is tracemalloc's peak of Python-allocated
memory (numpy arrays included) during one render. Also prints the median time per rendering stage.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.labels import LABELS  # noqa: E402
from engine.phantom import (build_scene, load_label_table, render_scene, resolve_grid, sample_anatomy,  # noqa: E402
                            sample_findings, sample_label_set)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64,128,128")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    grid = resolve_grid(shape, None)
    table = load_label_table()
    workloads = {
        "normal": lambda seed: [],
        "CT-RATE label set": lambda seed: sample_findings(sample_label_set(np.random.default_rng(seed), table),
                                                          np.random.default_rng(seed)),
        "all 18 findings": lambda seed: sample_findings(list(LABELS), np.random.default_rng(seed)),
    }
    print(f"render_phantom on {shape} (z, y, x), spacing {tuple(round(s, 2) for s in grid.spacing)} mm; "
          f"{args.seeds} seeds x {args.runs} runs")
    seeds = range(1000, 1000 + args.seeds)
    cold = []
    for seed in seeds:
        t = time.perf_counter()
        sample_anatomy.cache_clear() if seed == seeds[0] else None
        sample_anatomy(seed)
        cold.append(time.perf_counter() - t)
    print(f"  per-seed anatomy (trees), built once per seed: median {1e3 * statistics.median(cold):.0f} ms")
    for name, make in workloads.items():
        times, stages, peak = [], {}, 0
        for seed in seeds:
            findings = make(seed)
            for run in range(args.runs):
                scene = build_scene(sample_anatomy(seed), grid, findings, seed)
                timings: dict[str, float] = {}
                if run == 0 and seed == seeds[0]:
                    tracemalloc.start()
                t = time.perf_counter()
                render_scene(scene, True, timings)
                times.append(time.perf_counter() - t)
                if tracemalloc.is_tracing():
                    peak = tracemalloc.get_traced_memory()[1]
                    tracemalloc.stop()
                    times.pop()                      # tracemalloc slows the traced run: leave it out of the timing
                for k, v in timings.items():
                    stages.setdefault(k, []).append(v)
        print(f"  {name:18s}: median {1e3 * statistics.median(times):6.0f} ms  (min {1e3 * min(times):.0f}, "
              f"max {1e3 * max(times):.0f})  peak memory {peak / 2**20:.0f} MiB")
        print("      stages: " + ", ".join(f"{k} {1e3 * statistics.median(v):.0f}" for k, v in stages.items()
                                        if statistics.median(v) >= 0.5e-3) + " (ms)")


if __name__ == "__main__":
    main()
