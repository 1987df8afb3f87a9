"""Benchmark of the chest-radiograph flow: CXR file -> 18 CT-level findings + the top-10 similar studies (the read,
the encoder, the zero-shot rule and the library search; models loaded once, outside the timing).

Prints the median of 5 runs and the process' peak resident memory (ru_maxrss). Target: <= 0.5 s on the 2-core CPU.
Needs a trained encoder (assets/x2ct or --cxr-weights; `python -m training x2ct --preset demo`).
    python bench/bench_x2ct.py [--runs 5] [--cxr PATH] [--cxr-weights DIR]
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.pipelines.ctclip import CTClipPipeline  # noqa: E402
from engine.pipelines.cxr import CXRPipeline  # noqa: E402
from engine.radiograph import read_radiograph  # noqa: E402
from engine.settings import shared_data  # noqa: E402
from engine.study_library import StudyLibrary  # noqa: E402

TARGET_S = 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cxr", default=str(shared_data() / "cxr" / "00000001_000.png"))
    parser.add_argument("--cxr-weights", default=None)
    args = parser.parse_args()
    ctclip = CTClipPipeline.from_pretrained()
    pipeline = CXRPipeline.from_pretrained(args.cxr_weights, ctclip=ctclip)
    library = StudyLibrary(ctclip)
    ctclip.prompt_latents   # encoded once per process, as the app does at start-up

    def once():
        latent = pipeline.embed_radiograph(read_radiograph(args.cxr))
        return ctclip.zero_shot_from_latent(latent), library.search(latent, k=10)

    once()   # warm-up (first-call allocations)
    seconds = []
    for _ in range(args.runs):
        start = time.perf_counter()
        once()
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"CXR -> 18 findings + top-10 of {len(library)} studies, median of {args.runs}: "
          f"{statistics.median(seconds):.3f} s (target <= {TARGET_S} s)")
    print(f"peak resident memory: {peak:.0f} MB")


if __name__ == "__main__":
    main()
