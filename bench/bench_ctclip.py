"""CT-CLIP benchmark on CPU: parameter counts of both presets, demo latency, paper CT-ViT forward on one volume.

    .venv/bin/python bench/bench_ctclip.py               # everything (the paper forward runs once, in a subprocess)
    .venv/bin/python bench/bench_ctclip.py --skip-paper  # counts + demo only

Prints medians of several runs (the paper forward: a single run, it is slow) and the peak resident memory of the
process that ran each part (ru_maxrss). No targets: numbers are for the record.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.models.ctclip import CTCLIP, CTCLIPConfig  # noqa: E402
from engine.models.ctvit import CTViT  # noqa: E402
from timing import median_seconds, peak_rss_mb  # noqa: E402  (bench/timing.py)

REFERENCE_PARAMS = 438_148_761  # shared/manifests/ctclip_v2.counts.json
REPORT = "Bilateral pleural effusion is present. Mild cardiomegaly. No pulmonary nodule."



def count(model: torch.nn.Module, prefix: str = "") -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


def parameter_counts() -> dict:
    with torch.device("meta"):
        paper = CTCLIP(CTCLIPConfig.paper())
    demo = CTCLIP(CTCLIPConfig.demo())
    out = {}
    for name, model in (("paper", paper), ("demo", demo)):
        out[name] = {
            "total": count(model),
            "visual_transformer": count(model, "visual_transformer."),
            "text_transformer": count(model, "text_transformer."),
            "to_visual_latent": count(model, "to_visual_latent."),
            "buffers": sum(b.numel() for _, b in model.named_buffers()),
        }
    out["paper"]["reference_total"] = REFERENCE_PARAMS
    out["paper"]["matches_reference"] = out["paper"]["total"] == REFERENCE_PARAMS
    return out


def bench_demo(runs: int) -> dict:
    torch.manual_seed(0)
    model = CTCLIP.build(CTCLIPConfig.demo(), pretrained_text=True).eval()
    volume = torch.randn(1, 1, *model.config.vision.input_shape).clamp(-1, 1)
    tokens = model.tokenize([REPORT])
    pair = model.tokenize([REPORT, "No acute findings."])
    volumes = torch.randn(2, 1, *model.config.vision.input_shape).clamp(-1, 1)
    with torch.inference_mode():
        image_s = median_seconds(lambda: model.encode_image(volume), runs)
        text_s = median_seconds(lambda: model.encode_text(**tokens), runs)
        heat_s = median_seconds(lambda: model.token_scores(model.image_tokens(volume), model.encode_text(**tokens)),
                                runs)
    model.train()

    def train_step():
        model.zero_grad()
        model(pair["input_ids"], pair["attention_mask"], volumes).loss.backward()

    step_s = median_seconds(train_step, max(2, runs // 2))
    return {
        "input_shape_zyx": list(model.config.vision.input_shape),
        "encode_image_s": round(image_s, 4),
        "encode_text_s": round(text_s, 4),
        "image_text_heatmap_s": round(heat_s, 4),
        "train_step_batch2_s": round(step_s, 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def bench_paper_ctvit() -> dict:
    """One eval forward of the paper CT-ViT (random weights) on a (1, 1, 240, 480, 480) volume."""
    torch.manual_seed(0)
    vit = CTViT(CTCLIPConfig.paper().vision).eval()
    volume = torch.randn(1, 1, 240, 480, 480).clamp(-1, 1)
    rss_before = peak_rss_mb()
    with torch.inference_mode():
        start = time.perf_counter()
        tokens = vit(volume)
        seconds = time.perf_counter() - start
    return {
        "input_shape": [1, 1, 240, 480, 480],
        "tokens_shape": list(tokens.shape),
        "forward_s_single_run": round(seconds, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_rss_before_forward_mb": round(rss_before, 1),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-paper", action="store_true")
    parser.add_argument("--only-paper-forward", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only_paper_forward:
        print(json.dumps(bench_paper_ctvit()))
        return
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "parameters": parameter_counts()}
    result["demo"] = bench_demo(args.runs)
    if not args.skip_paper:  # own process, so its peak memory is its own
        done = subprocess.run([sys.executable, __file__, "--only-paper-forward"], capture_output=True, text=True)
        result["paper_ctvit_forward"] = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0
                                         else {"error": done.stderr.strip().splitlines()[-1:]})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
