"""Build the demo library: `python -m training.build_library --n 300 --seed-base 1000000`.

`python -m training.build_library --embeddings [--checkpoint assets/ctclip]` then encodes every library study with
the CT CLIP and writes assets/library/ctclip_embeddings.safetensors (tied to that checkpoint's model id); run it after
every new CT CLIP checkpoint.

Writes assets/library/studies.json: one entry per phantom study (id, seed, labels, structured findings, report),
made by engine.phantom.make_study with label sets sampled from CT-RATE's real label table (so co-occurrence is
realistic). Only the parameters are stored; the app re-renders a volume from (findings, seed) when a study is opened.

Seed ranges: the library uses seeds from LIBRARY_SEED_MIN = 1,000,000 up (demo-0001 = seed-base + 0, ...), disjoint
from every training and evaluation seed (training/ctclip_data.py: train 0.., real-report studies 500,000..,
held-out test 900,000..999,999), so no library study is ever trained on.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqdm import tqdm

from engine.library import DEFAULT_LIBRARY_PATH, LIBRARY_SEED_MIN, DemoLibrary, LibraryStudy

PARAMETERS_ONLY_GRID = (16, 32, 32)  # a coarse grid (the smallest leaves too little lung to place findings)


def build(n: int, seed_base: int) -> DemoLibrary:
    """n phantom studies with seeds seed_base .. seed_base + n - 1 (labels sampled from CT-RATE's table)."""
    if seed_base < LIBRARY_SEED_MIN:
        raise SystemExit(f"--seed-base must be >= {LIBRARY_SEED_MIN:,} (lower seeds are training/test seeds).")
    from engine.phantom import make_study

    studies = []
    for i in tqdm(range(n), desc="phantom studies", unit="study"):
        seed = seed_base + i
        # Labels, findings and report come from default_rng(seed) whatever the grid (the volume is rendered from the
        # seed and findings alone), so a coarse grid gives the same study as the demo grid at a fraction of the cost;
        # the app renders the demo-grid volume when the study is opened (tests/test_library.py checks they agree).
        study = make_study(seed, labels=None, shape_zyx=PARAMETERS_ONLY_GRID)
        studies.append(LibraryStudy(id=f"demo-{i + 1:04d}", seed=seed, labels=tuple(study.labels),
                                    findings=tuple(study.findings), report_findings=study.report.findings,
                                    report_impression=study.report.impression))
    return DemoLibrary(studies)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="number of studies (default 300)")
    parser.add_argument("--seed-base", type=int, default=LIBRARY_SEED_MIN,
                        help=f"seed of the first study (>= {LIBRARY_SEED_MIN:,}; default {LIBRARY_SEED_MIN:,})")
    parser.add_argument("--out", type=Path, default=DEFAULT_LIBRARY_PATH, help="output JSON")
    parser.add_argument("--embeddings", action="store_true",
                        help="encode the existing library with the CT CLIP instead of building the studies")
    parser.add_argument("--checkpoint", type=Path, default=None, help="CT CLIP folder (default assets/ctclip)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.embeddings:
        from engine.pipelines.ctclip import CTClipPipeline
        from engine.study_library import build_demo_embeddings

        pipeline = CTClipPipeline.from_pretrained(args.checkpoint)
        path = build_demo_embeddings(pipeline, progress=lambda s: tqdm(s, desc="encoding studies", unit="study"))
        print(f"wrote the latents of the demo library ({pipeline.model_id}) to {path} "
              f"in {time.perf_counter() - started:.0f} s")
        return
    library = build(args.n, args.seed_base)
    path = library.save(args.out)
    with_findings = sum(bool(s.labels) for s in library)
    print(f"wrote {len(library)} studies ({with_findings} with findings) to {path} "
          f"in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
