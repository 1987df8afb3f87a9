"""What every bench script measures with: the median wall-clock time of a call and this process's peak memory.
The scripts run as `python bench/bench_X.py`, so this folder is on sys.path and `from timing import ...` finds it."""
from __future__ import annotations

import resource
import statistics
import time


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_seconds(function, runs: int) -> float:
    """Median wall-clock seconds of `runs` calls of function(), after one warm-up call (first-call allocations)."""
    function()
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)
