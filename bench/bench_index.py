"""Benchmark of engine/index.py: exact cosine search over a library of random 512-d embeddings.

    .venv/bin/python bench/bench_index.py [--sizes 1000 100000] [--queries 50]

For each library size: time to add the rows (1,000 one-commit-each adds for the small case, one `add_many`
transaction for the big one), file size, time of the first search (loads the float32 matrix from SQLite),
median / p90 of `--queries` searches (k=10) once loaded (target <= 20 ms per query at 100,000 studies),
and peak memory (Python/numpy allocations via tracemalloc, and the process's peak RSS).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.index import EmbeddingIndex  # noqa: E402

DIM = 512


def bench(n: int, n_queries: int, workdir: Path) -> None:
    rng = np.random.default_rng(n)
    embeddings = rng.normal(size=(n, DIM)).astype(np.float32)
    index = EmbeddingIndex(workdir / f"lib_{n}.sqlite", model_id="bench")
    t0 = time.perf_counter()
    if n <= 1000:
        for i, e in enumerate(embeddings):
            index.add(f"study-{i}", e, sha256=f"{i:064x}", source="phantom", labels=[0] * 18)
        how = "one commit per add"
    else:
        index.add_many({"id": f"study-{i}", "embedding": e, "sha256": f"{i:064x}", "source": "phantom",
                        "labels": [0] * 18} for i, e in enumerate(embeddings))
        how = "add_many, one transaction"
    add_s = time.perf_counter() - t0
    del embeddings

    tracemalloc.start()
    t0 = time.perf_counter()
    index.search(rng.normal(size=DIM), k=10)                       # loads the matrix
    first_s = time.perf_counter() - t0
    times = []
    for query in rng.normal(size=(n_queries, DIM)):
        t0 = time.perf_counter()
        index.search(query, k=10)
        times.append(time.perf_counter() - t0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    times.sort()
    index.close()                                                  # checkpoints the WAL into the file
    size_mb = sum(p.stat().st_size for p in workdir.glob(f"lib_{n}.sqlite*")) / 1e6
    print(f"n={n:>7,}  add {add_s:7.2f} s ({how}, {1e3 * add_s / n:.3f} ms/study)  file {size_mb:7.1f} MB  "
          f"first search {1e3 * first_s:7.1f} ms  search median {1e3 * statistics.median(times):6.2f} ms  "
          f"p90 {1e3 * times[int(0.9 * len(times))]:6.2f} ms  peak traced {peak / 1e6:6.1f} MB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--queries", type=int, default=50)
    args = parser.parse_args()
    print(f"numpy {np.__version__}, {DIM}-d float32 embeddings, exact cosine, k=10, {args.queries} queries")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            bench(n, args.queries, Path(tmp))
    print(f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
