"""`python -m training STAGE ...`: reproduce the project's checkpoints.

    python -m training ctclip --preset demo|paper [--steps N] [--batch-size B] [--out DIR] [--cache DIR] [--resume]
                              [--init-from CHECKPOINT_DIR] [--seed S] [--density-log-share]
                              [--vision ctvit|token_features] [--n-train-generated N] [--n-train-real N]
                              [--n-token-masks N]
    python -m training ctclip-export [--run runs/ctclip-demo] [--out assets/ctclip]
    python -m training ctclip-eval --checkpoint assets/ctclip [--cache DIR] [--out FILE] [--n-test N]
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
    if args.vision == "token_features" and args.preset != "demo":
        print("error: --vision token_features is a demo-preset encoder.", file=sys.stderr)
        return 2
    cfg = TrainConfig.paper() if args.preset == "paper" else \
        TrainConfig.demo_token_features() if args.vision == "token_features" else TrainConfig.demo()
    overrides = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                                   "num_workers": args.num_workers, "seed": args.seed,
                                   "n_train_generated": args.n_train_generated, "n_train_real": args.n_train_real,
                                   "n_token_masks": args.n_token_masks}.items() if v is not None}
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
    metrics = evaluate(Path(args.checkpoint), cache_root=args.cache, out=args.out, n_test=args.n_test)
    print(json.dumps({k: metrics[k] for k in ("zero_shot_macro_auroc", "recall_at_10", "map_at_10")
                      if k in metrics}))
    return 0


def _ctclip_export(args) -> int:
    from training.train_ctclip import export_checkpoint
    print(json.dumps(export_checkpoint(Path(args.run), Path(args.out))))
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
    p.add_argument("--vision", choices=("ctvit", "token_features"), default="ctvit",
                   help="demo image tower: the CT-ViT on voxels, or the token-feature encoder (TrainConfig."
                   "demo_token_features: cached per-token features, + the token-level loss on the focal masks)")
    p.add_argument("--n-train-generated", type=int, help="demo: generated phantoms in the training cache")
    p.add_argument("--n-train-real", type=int, help="demo: real-report phantoms in the training cache")
    p.add_argument("--n-token-masks", type=int, help="token_features: training studies whose focal masks are drawn")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP (paper preset, several GPUs)")
    p.add_argument("--data-root", help="CT-RATE dataset root holding train/ and valid/ (paper)")
    p.add_argument("--reports-csv")
    p.add_argument("--metadata-csv")
    p.set_defaults(func=_ctclip)
    e = sub.add_parser("ctclip-eval", help="evaluate a CT CLIP checkpoint on the held-out phantom test split")
    e.add_argument("--checkpoint", default=str(settings.ASSETS / "ctclip"))
    e.add_argument("--cache", help="phantom cache directory (default cache/ctclip-demo)")
    e.add_argument("--out", help="metrics.json path (default CHECKPOINT/metrics.json)")
    e.add_argument("--n-test", type=int, default=300, help="held-out studies evaluated (the first N that render)")
    e.set_defaults(func=_ctclip_eval)
    x = sub.add_parser("ctclip-export", help="copy a run's model to assets/ctclip (float16)")
    x.add_argument("--run", default=str(settings.training_runs_dir() / "ctclip-demo"))
    x.add_argument("--out", default=str(settings.ASSETS / "ctclip"))
    x.set_defaults(func=_ctclip_export)
    args = parser.parse_args(argv)
    from engine.errors import UserError
    try:
        return args.func(args)
    except UserError as err:    # bad input (a missing checkpoint, another architecture...): one sentence, exit 2
        print(json.dumps({"error": str(err)}))
        return 2


if __name__ == "__main__":
    sys.exit(main())
