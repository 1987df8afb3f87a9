"""Benchmark of the CT input path: read lung1 (NIfTI, 512 x 512 x 48) and resample it to the demo grid.

Prints the median of 5 runs per step and the peak memory: Python-side allocations (tracemalloc, numpy arrays
included) and the process' peak resident set (ru_maxrss, which also counts SimpleITK's C++ buffers).
Target: read + resample to the demo grid <= 1.5 s on the 2-core CPU.
    python bench/bench_io.py [--runs 5] [--ct PATH]
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.transforms import DEMO, resample_to_grid, to_model_tensor  # noqa: E402
from engine.volume import DEMO_SHAPE_ZYX, DEMO_SPACING_XYZ, inspect_ct, read_ct  # noqa: E402

TARGET_S = 1.5


def timed(function, runs: int) -> tuple[float, float, object]:
    """(median seconds, peak traced MB, last result) over `runs` calls."""
    seconds, peaks, result = [], [], None
    for _ in range(runs):
        tracemalloc.start()
        start = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - start)
        peaks.append(tracemalloc.get_traced_memory()[1] / 1e6)
        tracemalloc.stop()
    return statistics.median(seconds), max(peaks), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ct", type=Path, default=ROOT.parent / "shared" / "data" / "ct" / "lung1_image.nii.gz")
    args = parser.parse_args()

    volume = read_ct(args.ct)  # warm-up: imports, thread pools
    steps = [
        ("read_ct (NIfTI -> HU, LPS)", lambda: read_ct(args.ct)),
        ("resample_to_grid (demo grid)", lambda: resample_to_grid(volume, DEMO_SHAPE_ZYX, DEMO_SPACING_XYZ)),
        ("read_ct + resample_to_grid", lambda: resample_to_grid(read_ct(args.ct), DEMO_SHAPE_ZYX, DEMO_SPACING_XYZ)),
        ("to_model_tensor(DEMO)", lambda: to_model_tensor(volume, DEMO)),
        ("inspect_ct", lambda: inspect_ct(volume)),
    ]
    spacing = tuple(round(s, 4) for s in volume.spacing)
    print(f"CT: {args.ct.name}, shape (x, y, z) {volume.shape_xyz}, spacing {spacing} mm; "
          f"demo grid (z, y, x) {DEMO_SHAPE_ZYX}; {args.runs} runs each")
    print(f"{'step':<34}{'median s':>10}{'peak traced MB':>16}")
    print("-" * 60)
    total = None
    for name, function in steps:
        median, peak, _ = timed(function, args.runs)
        print(f"{name:<34}{median:>10.3f}{peak:>16.1f}")
        if name == "read_ct + resample_to_grid":
            total = median
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("-" * 60)
    print(f"process peak RSS (ru_maxrss): {maxrss_mb:.0f} MB")
    verdict = "OK" if total <= TARGET_S else "SLOWER THAN TARGET"
    print(f"read + resample to the demo grid: {total:.3f} s (target <= {TARGET_S} s): {verdict}")


if __name__ == "__main__":
    main()
