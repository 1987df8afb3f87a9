"""Latency of the CT CLIP flows on this machine (demo preset, CPU): median of several runs and peak memory.

    text query -> top-10 over the demo library              (target <= 0.3 s)
    zero-shot of one CT for 18 labels                        (target <= 0.5 s), and the ratio against the reference's
        loop, which re-encodes the volume and the two prompts once per label (18 CT passes + 18 text passes)
    heat map of one query on one CT                          (no target)

Run: .venv/bin/python bench/bench_trunk.py   (uses assets/ctclip; falls back to an untrained demo-sized model, which
has the same cost, when no checkpoint is shipped)
"""
from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.labels import LABELS  # noqa: E402
from engine.models.ctclip import zero_shot_prompts  # noqa: E402
from engine.pipelines.ctclip import CTClipPipeline  # noqa: E402
from engine.settings import ctclip_dir  # noqa: E402
from engine.study_library import StudyLibrary  # noqa: E402
from engine.volume import read_ct  # noqa: E402

LUNG1 = ROOT.parent / "shared" / "data" / "ct" / "lung1_image.nii.gz"
QUERY = "Right pleural effusion with adjacent atelectasis and centrilobular emphysema in both upper lobes."


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def load_pipeline() -> CTClipPipeline:
    if (ctclip_dir() / "config.json").is_file():
        return CTClipPipeline.from_pretrained()
    from engine.models.ctclip import CTCLIP, CTCLIPConfig

    print("(no shipped checkpoint: timing an untrained demo-sized model)")
    return CTClipPipeline(CTCLIP.build(CTCLIPConfig.demo()), model_id="untrained")


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    pipeline = load_pipeline()
    print(f"load pipeline: {time.perf_counter() - start:.2f} s, threads {torch.get_num_threads()}")
    library = StudyLibrary(pipeline, user_dir=ROOT / "runs" / "bench-library")
    print(f"demo library: {len(library.demo.studies)} studies, {len(library.demo_ids)} shipped embeddings")
    volume = read_ct(LUNG1)
    pipeline.prompt_latents  # noqa: B018  (cached once per pipeline, as in the app)
    rows = []

    t, results = timed(lambda: library.search(pipeline.embed_query(QUERY), k=10), 10)
    rows.append(("text query -> top-10 (embed + search)", t, 0.3))
    prepared, tensor = pipeline.preprocess(volume)
    t_pre, _ = timed(lambda: pipeline.preprocess(volume), 5)
    t_zs, probs = timed(lambda: pipeline.zero_shot(volume), 5)
    rows.append(("zero-shot 18 labels, lung1 (read excluded)", t_zs, 0.5))
    rows.append(("  of which preprocessing to the demo grid", t_pre, None))

    def reference_loop():
        out = {}
        for label in LABELS:  # CT-CLIP's evaluation loop: volume and both prompts encoded again for every label
            with torch.inference_mode():
                image = pipeline.model.encode_image(tensor)[0]
            text = torch.from_numpy(pipeline.embed_texts(list(zero_shot_prompts(label))))
            out[label] = float((pipeline.model.logit_scale.detach() * text @ image).softmax(0)[0])
        return out

    t_ref, _ = timed(reference_loop, 2)
    rows.append(("reference loop (18 CT + 18 text passes)", t_ref + t_pre, None))
    t_heat, _ = timed(lambda: pipeline.heatmap(volume, QUERY), 3)
    rows.append(("heat map of one query on lung1", t_heat, None))

    print(f"\n{'step':48s} {'median s':>9s} {'target s':>9s}")
    for name, seconds, target in rows:
        flag = "" if target is None else ("  ok" if seconds <= target else "  OVER")
        print(f"{name:48s} {seconds:9.3f} {target if target else '':>9}{flag}")
    print(f"\nzero-shot speed-up over the reference loop: {(t_ref + t_pre) / t_zs:.1f}x")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
