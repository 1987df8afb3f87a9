"""Benchmark of the chest-radiograph flow (issue 14's targets on the 2-core CPU):

- findings: a CXR file -> 18 CT-level findings + the top-10 similar studies (read, plausibility check, encoder,
  zero-shot rule, library search; the models loaded once, outside the timing). Target <= 0.5 s.
- drr: a PA radiograph of lung1 at full resolution (NIfTI 512 x 512 x 48 voxels, 0.57 x 0.57 x 5 mm -> 421 x 512
  pixels of 0.57 mm), clean and with a random augmentation; the CT read once, outside the timing. Target <= 1 s.

Each part runs in its own process, so the peak resident memory printed for it (ru_maxrss) is its own; times are the
median of --runs runs after one warm-up. The findings part needs a trained encoder (assets/x2ct or --cxr-weights;
`python -m training x2ct --preset demo`) and says so in one line otherwise.
    python bench/bench_cxr.py [--runs 5] [--cxr PATH] [--ct PATH] [--cxr-weights DIR]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.settings import shared_data  # noqa: E402
from timing import median_seconds, peak_rss_mb  # noqa: E402  (bench/timing.py)

TARGETS_S = {"findings": 0.5, "drr": 1.0}



def bench_findings(args) -> dict:
    from engine.errors import UserError
    from engine.pipelines.ctclip import CTClipPipeline
    from engine.pipelines.cxr import CXRPipeline, cxr_model_dir
    from engine.radiograph import read_radiograph
    from engine.study_library import StudyLibrary

    try:
        weights = cxr_model_dir(args.cxr_weights)
    except UserError as err:
        return {"skipped": str(err)}
    ctclip = CTClipPipeline.from_pretrained()
    pipeline = CXRPipeline.from_pretrained(weights, ctclip=ctclip)
    library = StudyLibrary(ctclip)
    ctclip.prompt_latents   # encoded once per process, as the app does at start-up
    rss_loaded = peak_rss_mb()

    def once():
        latent = pipeline.embed_radiograph(read_radiograph(args.cxr))
        return ctclip.zero_shot_from_latent(latent), library.search(latent, k=10)

    seconds = median_seconds(once, args.runs)
    return {"what": f"CXR -> 18 findings + top-10 of {len(library)} studies", "median_s": round(seconds, 4),
            "target_s": TARGETS_S["findings"], "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_rss_after_loading_mb": round(rss_loaded, 1)}


def bench_drr(args) -> dict:
    import numpy as np

    from engine.drr import DRRAugmentation, simulate_radiograph
    from engine.volume import read_ct

    volume = read_ct(args.ct)
    rss_read = peak_rss_mb()
    augmentation = DRRAugmentation.sample(np.random.default_rng(0))
    clean = median_seconds(lambda: simulate_radiograph(volume), args.runs)
    augmented = median_seconds(lambda: simulate_radiograph(volume, augmentation=augmentation, seed=0), args.runs)
    return {"what": f"DRR of {Path(args.ct).name} {volume.array.shape} (z, y, x) -> "
                    f"{simulate_radiograph(volume).image.shape} pixels",
            "median_s": round(clean, 4), "augmented_median_s": round(augmented, 4), "target_s": TARGETS_S["drr"],
            "peak_rss_mb": round(peak_rss_mb(), 1), "peak_rss_after_reading_mb": round(rss_read, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cxr", default=str(shared_data() / "cxr" / "00000001_000.png"))
    parser.add_argument("--ct", default=str(shared_data() / "ct" / "lung1_image.nii.gz"))
    parser.add_argument("--cxr-weights", default=None)
    parser.add_argument("--part", choices=tuple(TARGETS_S), help=argparse.SUPPRESS)   # one part, in this process
    args = parser.parse_args()
    if args.part:
        print(json.dumps((bench_findings if args.part == "findings" else bench_drr)(args)))
        return
    result = {}
    for part in TARGETS_S:                      # each in its own process: its peak memory is its own
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--part", part], capture_output=True,
                              text=True)
        result[part] = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0
                        else {"error": done.stderr.strip().splitlines()[-1:]})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
