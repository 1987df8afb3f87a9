"""Viewer latency: one plane_image call per plane (median of 20 runs), the 3-D figure, and peak memory.

Run: `python bench/bench_viewer.py` (uses ../shared/data/ct/lung1_image.nii.gz, 512 x 512 x 48 at 0.57 x 0.57 x 5 mm,
and the first demo-library phantom on the demo grid, 128 x 128 x 64 at 2.73 x 2.73 x 4.69 mm). Target: < 50 ms per plane.
"""
from __future__ import annotations

import os
import resource
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from engine.viewing import PLANES, WINDOWS, figure_3d, plane_count, plane_image  # noqa: E402
from engine.library import DemoLibrary  # noqa: E402
from engine.volume import Volume, read_ct  # noqa: E402

SHARED = Path(os.environ.get("CT_SHARED_DATA", ROOT.parent / "shared" / "data"))
RUNS = 20


def median_ms(fn, runs: int = RUNS) -> tuple[float, float]:
    """(median ms, peak traced MB) over `runs` calls."""
    times = []
    tracemalloc.start()
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return statistics.median(times), peak


def bench(name: str, volume: Volume) -> None:
    x, y, z = volume.shape_xyz
    print(f"{name}: {x} x {y} x {z}, spacing {tuple(round(s, 3) for s in volume.spacing)} mm")
    level, width = WINDOWS["lung"]
    heat = np.random.default_rng(0).random(volume.array.shape, dtype=np.float32)
    for plane in PLANES:
        index = plane_count(volume, plane) // 2
        ms, peak = median_ms(lambda: plane_image(volume, plane, index, level, width))
        ms_ov, peak_ov = median_ms(lambda: plane_image(volume, plane, index, level, width, overlay=heat))
        print(f"  plane_image {plane:9s} {ms:6.1f} ms (peak {peak:5.1f} MB)   with overlay {ms_ov:6.1f} ms "
              f"(peak {peak_ov:5.1f} MB)")
    ms, peak = median_ms(lambda: figure_3d(volume), runs=3)
    fig = figure_3d(volume)
    faces = sum(len(t.i) for t in fig.data)
    print(f"  figure_3d           {ms:6.0f} ms (median of 3, peak {peak:5.0f} MB), {faces} triangles, "
          f"{len(fig.to_json()) / 2**20:.1f} MB of JSON")


def main() -> None:
    lung1 = read_ct(SHARED / "ct" / "lung1_image.nii.gz")
    bench("lung1", lung1)
    library = DemoLibrary.load()
    bench(f"demo grid ({library.studies[0].id}, the first library phantom)", library.volume(library.studies[0].id))
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
