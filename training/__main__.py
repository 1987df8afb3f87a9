"""`python -m training STAGE ...`: reproduce the project's checkpoints.

    python -m training ctclip --preset demo|paper [--steps N] [--batch-size B] [--out DIR] [--cache DIR] [--resume]
                              [--init-from CHECKPOINT_DIR] [--seed S] [--density-log-share]
    python -m training ctclip-export [--run runs/ctclip-demo] [--out assets/ctclip]
    python -m training ctclip-eval --checkpoint assets/ctclip [--cache DIR] [--out FILE]
    python -m training speech --preset demo|paper [--distill-weight L | --no-distill] [--steps N] [--resume] ...
    python -m training speech-eval --checkpoint runs/speech-demo/model [--test-studies N]
Multi-GPU: torchrun --nproc_per_node G -m training ctclip --preset paper --data-root DIR --reports-csv F
    --metadata-csv F [--fsdp]
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from engine import settings


def _ctclip(args) -> int:
    from training.train_ctclip import TrainConfig, train
    cfg = TrainConfig.demo() if args.preset == "demo" else TrainConfig.paper()
    overrides = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                                   "num_workers": args.num_workers, "seed": args.seed}.items() if v is not None}
    if args.time_budget_min is not None:
        overrides["time_budget_s"] = 60.0 * args.time_budget_min
    if args.fsdp:
        overrides["fsdp"] = True
    if args.density_log_share:
        overrides["model_overrides"] = {**cfg.model_overrides, "patch_hu_log_share": True}
    for name in ("data_root", "reports_csv", "metadata_csv", "init_from"):
        if getattr(args, name):
            overrides[name] = getattr(args, name)
    cfg = replace(cfg, **overrides)
    if cfg.preset == "paper" and not (cfg.data_root and cfg.reports_csv and cfg.metadata_csv):
        print("error: the paper preset needs --data-root, --reports-csv and --metadata-csv (CT-RATE).", file=sys.stderr)
        return 2
    out = Path(args.out or settings.training_runs_dir() / f"ctclip-{cfg.preset}")
    summary = train(cfg, out, cache_root=args.cache, resume=args.resume)
    if summary.get("rank", 0) == 0:
        print(json.dumps(summary))
    return 0


def _ctclip_eval(args) -> int:
    from training.eval_ctclip import evaluate
    metrics = evaluate(Path(args.checkpoint), cache_root=args.cache, out=args.out)
    print(json.dumps({k: metrics[k] for k in ("zero_shot_macro_auroc", "recall_at_10", "map_at_10")
                      if k in metrics}))
    return 0


def _ctclip_export(args) -> int:
    from training.train_ctclip import export_checkpoint
    print(json.dumps(export_checkpoint(Path(args.run), Path(args.out))))
    return 0


def _speech(args) -> int:
    from training.train_speech import SpeechTrainConfig, train
    cfg = SpeechTrainConfig.demo() if args.preset == "demo" else SpeechTrainConfig.paper()
    overrides = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                                   "seed": args.seed, "distill_weight": args.distill_weight,
                                   "n_studies": args.studies, "n_test_studies": args.test_studies,
                                   "audio_dir": args.audio_dir, "ct_latents": args.ct_latents,
                                   "reports_csv": args.reports_csv, "cpu_threads": args.threads}.items()
                 if v is not None}
    if args.no_distill:
        overrides["distill_weight"] = 0.0
    if args.time_budget_min is not None:
        overrides["time_budget_s"] = 60.0 * args.time_budget_min
    if args.synthesis_budget_min is not None:
        overrides["synthesis_budget_cpu_s"] = 60.0 * args.synthesis_budget_min
    cfg = replace(cfg, **overrides)
    out = Path(args.out or settings.training_runs_dir() / f"speech-{cfg.preset}")
    summary = train(cfg, out, cache_root=args.cache, resume=args.resume)
    print(json.dumps({k: v for k, v in summary.items() if k != "synthesis"} | {"synthesis": summary.get("synthesis")}))
    return 0


def _speech_eval(args) -> int:
    from training.eval_speech import evaluate
    budget = None if args.synthesis_budget_min is None else 60.0 * args.synthesis_budget_min
    metrics = evaluate(Path(args.checkpoint), cache_root=args.cache, out=args.out, n_test_studies=args.test_studies,
                       synthesis_budget_cpu_s=budget)
    print(json.dumps({k: v for k, v in metrics.items() if "recall" in k or "zero_shot" in k}))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training")
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("ctclip", help="train the CT CLIP")
    p.add_argument("--preset", choices=("demo", "paper"), default="demo")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--time-budget-min", type=float,
                   help="stop after this many minutes of training, the lr schedule finishing on time (shared CPUs)")
    p.add_argument("--out", help="run directory (default runs/ctclip-PRESET)")
    p.add_argument("--cache", help="phantom cache directory (demo; default cache/ctclip-demo)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--init-from", help="start from this CT CLIP directory (e.g. assets/ctclip) instead of scratch; "
                   "a fresh lr schedule (continued training)")
    p.add_argument("--seed", type=int, help="seed of the data order, augmentation and text draws")
    p.add_argument("--density-log-share", action="store_true",
                   help="demo: add the CT-ViT's log-share density channels (zero-initialised, so --init-from a model "
                   "without them continues exactly where it was)")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP (paper preset, several GPUs)")
    p.add_argument("--data-root", help="CT-RATE dataset root holding train/ and valid/ (paper)")
    p.add_argument("--reports-csv")
    p.add_argument("--metadata-csv")
    p.set_defaults(func=_ctclip)
    e = sub.add_parser("ctclip-eval", help="evaluate a CT CLIP checkpoint on the held-out phantom test split")
    e.add_argument("--checkpoint", default=str(settings.ASSETS / "ctclip"))
    e.add_argument("--cache", help="phantom cache directory (default cache/ctclip-demo)")
    e.add_argument("--out", help="metrics.json path (default CHECKPOINT/metrics.json)")
    e.set_defaults(func=_ctclip_eval)
    x = sub.add_parser("ctclip-export", help="copy a run's model to assets/ctclip (float16)")
    x.add_argument("--run", default=str(settings.training_runs_dir() / "ctclip-demo"))
    x.add_argument("--out", default=str(settings.ASSETS / "ctclip"))
    x.set_defaults(func=_ctclip_export)
    s = sub.add_parser("speech", help="train the speech encoder (SpeechCT-CLIP) against the frozen CT CLIP")
    s.add_argument("--preset", choices=("demo", "paper"), default="demo")
    s.add_argument("--steps", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--distill-weight", type=float, help="lambda of (1 - cos(audio, text teacher)); default 1.0")
    s.add_argument("--no-distill", action="store_true", help="the ablation: contrastive audio <-> CT only")
    s.add_argument("--time-budget-min", type=float, help="stop training after this many minutes")
    s.add_argument("--synthesis-budget-min", type=float, help="demo: CPU minutes for new Kokoro clips (default 60)")
    s.add_argument("--studies", type=int, help="demo: training phantom studies (default 400)")
    s.add_argument("--test-studies", type=int, help="demo: held-out phantom studies (default 100)")
    s.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a shared, oversubscribed CPU)")
    s.add_argument("--out", help="run directory (default runs/speech-PRESET)")
    s.add_argument("--cache", help="data cache (demo; default cache/speech-demo)")
    s.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    s.add_argument("--audio-dir", help="paper: audio files named by CT-RATE VolumeName")
    s.add_argument("--ct-latents", help="paper: frozen CT-CLIP latents (safetensors keyed by VolumeName)")
    s.add_argument("--reports-csv", help="paper: CT-RATE reports (VolumeName, Findings_EN) for the text teacher")
    s.set_defaults(func=_speech)
    v = sub.add_parser("speech-eval", help="evaluate a speech encoder on unseen voices (held-out phantom split)")
    v.add_argument("--checkpoint", default=str(settings.ASSETS / "speech"))
    v.add_argument("--cache", help="data cache (default cache/speech-demo)")
    v.add_argument("--out", help="metrics.json path (default CHECKPOINT/metrics.json)")
    v.add_argument("--test-studies", type=int, default=100)
    v.add_argument("--synthesis-budget-min", type=float, help="CPU minutes for new Kokoro test clips (default: all)")
    v.set_defaults(func=_speech_eval)
    args = parser.parse_args(argv)
    from engine.errors import UserError
    try:
        return args.func(args)
    except UserError as err:    # bad input (a missing checkpoint, another architecture...): one sentence, exit 2
        print(json.dumps({"error": str(err)}))
        return 2


if __name__ == "__main__":
    sys.exit(main())
