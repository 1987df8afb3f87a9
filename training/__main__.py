"""`python -m training STAGE ...`: reproduce the project's checkpoints.

    python -m training ctclip --preset demo|paper [--steps N] [--batch-size B] [--out DIR] [--cache DIR] [--resume]
                              [--init-from CHECKPOINT_DIR] [--seed S] [--density-log-share]
                              [--vision ctvit|token_features] [--n-train-generated N] [--n-train-real N]
                              [--n-token-masks N]
    python -m training ctclip-export [--run runs/ctclip-demo] [--out assets/ctclip]
    python -m training ctclip-ood --checkpoint assets/ctclip [--cache DIR] [--n-fit N] [--n-calibrate M] [--n-test T]
                                  [--quantile Q] [--workers W]      (after ctclip-eval: it merges into metrics.json)
    python -m training ctclip-text-reading --checkpoint assets/ctclip [--cache DIR] [--n-test N]   (after ctclip-eval)
    python -m training ctclip-eval --checkpoint assets/ctclip [--cache DIR] [--out FILE] [--n-test N]
    python -m training vae --preset demo|paper [--steps N] [--time-budget-min M] [--out DIR] [--resume]
    python -m training ldm --preset demo|paper [--vae DIR] [--steps N] [--time-budget-min M] [--out DIR] [--resume]
    python -m training ldm-export [--vae DIR] [--unet DIR] [--out assets/generator]
    python -m training generate-eval [--generator assets/generator] [--n 60] [--n-sweep 24] [--ablation DIR]
    python -m training x2ct --preset demo|paper [--backbone resnet|swin] [--beta B --gamma G] [--n-train N]
                            [--n-test N] [--steps N] [--time-budget-min M] [--out DIR] [--cache DIR] [--resume]
    python -m training x2ct-eval --checkpoint runs/x2ct-demo/model [--cache DIR]
    python -m training speech --preset demo|paper [--distill-weight L | --no-distill] [--steps N] [--resume] ...
    python -m training speech --preset demo --synthesis-only        # make the Kokoro/espeak-ng clips, then stop
    python -m training speech-eval --checkpoint runs/speech-demo/model [--test-studies N] [--compare-no-distill DIR]
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
                                   "n_token_masks": args.n_token_masks, "token_loss_weight": args.token_loss_weight,
                                   "label_loss_weight": args.label_loss_weight,
                                   "prompt_label_loss_weight": args.prompt_label_loss_weight}.items() if v is not None}
    if args.time_budget_min is not None:
        overrides["time_budget_s"] = 60.0 * args.time_budget_min
    if args.fsdp:
        overrides["fsdp"] = True
    if args.density_log_share:
        overrides["model_overrides"] = {**cfg.model_overrides, "patch_hu_log_share": True}
    if args.init_text_from:
        overrides.update(init_text_from=args.init_text_from, frozen_text=True)
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


def _ctclip_ood(args) -> int:
    from training.ctclip_ood import fit_ood
    block = fit_ood(Path(args.checkpoint), cache_root=args.cache, n_fit=args.n_fit, n_calibrate=args.n_calibrate,
                    n_test=args.n_test, quantile=args.quantile, workers=args.workers)
    print(json.dumps({k: block[k] for k in ("threshold", "calibration_flag_rate", "test", "real_ct_flagged")
                      if k in block}))
    return 0


def _ctclip_text_reading(args) -> int:
    from training.ctclip_text_reading import fit_text_reading
    block = fit_text_reading(Path(args.checkpoint), cache_root=args.cache, n_test=args.n_test)
    print(json.dumps({name: {k: v for k, v in block[name].items() if k != "per_label_auroc"}
                      for name in ("image_rule", "pair_logit_platt", "reader")}))
    return 0


def _ctclip_export(args) -> int:
    from training.train_ctclip import export_checkpoint
    print(json.dumps(export_checkpoint(Path(args.run), Path(args.out))))
    return 0


def _generator_overrides(cfg, args):
    overrides = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                                   "seed": args.seed, "n_generated": args.n_generated,
                                   "n_real": args.n_real}.items() if v is not None}
    if args.time_budget_min is not None:
        overrides["time_budget_s"] = 60.0 * args.time_budget_min
    return replace(cfg, **overrides)


def _vae(args) -> int:
    from training.train_vae import VAETrainConfig, train_vae
    from training.train_ldm import default_run
    cfg = _generator_overrides(VAETrainConfig.demo() if args.preset == "demo" else VAETrainConfig.paper(), args)
    overrides = {k: v for k, v in {"init_from": args.init_from, "crop_zyx": args.crop}.items() if v}
    cfg = replace(cfg, decoder_only=bool(args.decoder_only), **overrides)
    if args.latent_channels:
        cfg = replace(cfg, model=replace(cfg.model, latent_channels=args.latent_channels))
    if args.adversarial_weight is not None:
        cfg = replace(cfg, adversarial_weight=args.adversarial_weight)
    out = Path(args.out or default_run("vae", cfg.preset))
    print(json.dumps(train_vae(cfg, out, cache_root=args.cache, resume=args.resume)))
    return 0


def _ldm(args) -> int:
    from training.train_ldm import LDMTrainConfig, default_run, train_ldm
    cfg = _generator_overrides(LDMTrainConfig.demo() if args.preset == "demo" else LDMTrainConfig.paper(), args)
    if args.context_encoder:
        cfg = replace(cfg, model=replace(cfg.model, context_encoder=args.context_encoder))
    if args.n_studies is not None:
        cfg = replace(cfg, n_studies=args.n_studies)
    out = Path(args.out or default_run("ldm", cfg.preset))
    vae = Path(args.vae or default_run("vae", cfg.preset) / "model")
    print(json.dumps(train_ldm(cfg, out, vae, cache_root=args.cache, resume=args.resume)))
    return 0


def _generate_eval(args) -> int:
    from training.eval_generate import evaluate
    metrics = evaluate(args.generator, n=args.n, n_sweep=args.n_sweep, steps=args.steps, guidance=args.guidance,
                       ablation_dir=args.ablation, cache_root=args.cache, out=args.out)
    print(json.dumps({k: metrics[k] for k in ("factual_correctness_macro_auroc", "factual_correctness_ratio",
                                              "fid_3d_ctclip_latent")}))
    return 0


def _ldm_export(args) -> int:
    from training.train_ldm import export_generator
    print(json.dumps(export_generator(Path(args.vae), Path(args.unet), Path(args.out))))
    return 0


def _add_generator_stages(sub) -> None:
    """vae, ldm (Text2CT's two stages) and ldm-export."""
    for stage, help_ in (("vae", "train the generator's 3-D autoencoder"),
                         ("ldm", "train the generator's latent diffusion U-Net (needs a trained autoencoder)")):
        p = sub.add_parser(stage, help=help_)
        p.add_argument("--preset", choices=("demo", "paper"), default="demo")
        p.add_argument("--steps", type=int)
        p.add_argument("--batch-size", type=int)
        p.add_argument("--lr", type=float)
        p.add_argument("--seed", type=int)
        p.add_argument("--n-generated", type=int, help="phantom studies to train on (demo)")
        p.add_argument("--n-real", type=int, help="phantoms of real CT-RATE reports to train on (demo)")
        p.add_argument("--time-budget-min", type=float, help="stop after this many minutes of training")
        p.add_argument("--out", help=f"run directory (default runs/{stage}-PRESET)")
        p.add_argument("--cache", help="phantom and latent cache (default cache/generator-demo)")
        p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
        if stage == "vae":
            p.add_argument("--init-from", help="an autoencoder folder to start from (default: fresh weights)")
            p.add_argument("--decoder-only", action="store_true",
                           help="freeze the encoder and train the decoder on its posterior means, so an existing "
                           "U-Net's latents stay valid (needs --init-from)")
            p.add_argument("--latent-channels", type=int,
                           help="channels of the latent (demo default 8; its grid is the volume's / 8 per axis)")
            p.add_argument("--adversarial-weight", type=float,
                           help="train a 3-D patch discriminator alongside, its least-squares generator term at this "
                           "weight (MAISI: 0.1; default 0 = L1 + KL only)")
            p.add_argument("--crop", type=_int_list, metavar="Z,Y,X",
                           help="voxels per training crop (demo default 32,64,64; 64,128,128 = whole volumes)")
        if stage == "ldm":
            p.add_argument("--vae", help="the autoencoder folder (default runs/vae-PRESET/model)")
            p.add_argument("--n-studies", type=int, help="demo: studies to encode and train on, spread evenly over "
                           "the phantom cache (default all; each costs about a second of VAE encoding)")
            p.add_argument("--context-encoder", choices=("ctclip", "minilm-mean"),
                           help="demo: condition on the CT CLIP's text latent (default) or, for the ablation 'text "
                           "encoder not aligned with CT', on all-MiniLM-L6-v2 mean-pooled")
        p.set_defaults(func=_vae if stage == "vae" else _ldm)
    x = sub.add_parser("ldm-export", help="copy a trained autoencoder and U-Net to assets/generator (float16)")
    x.add_argument("--vae", default=str(settings.training_runs_dir() / "vae-demo" / "model"))
    x.add_argument("--unet", default=str(settings.training_runs_dir() / "ldm-demo" / "model"))
    x.add_argument("--out", default=str(settings.ASSETS / "generator"))
    x.set_defaults(func=_ldm_export)
    e = sub.add_parser("generate-eval", help="evaluate a generator on held-out reports (factual correctness, FID "
                       "3-D and 2.5-D, guidance sweep, ablation) into GENERATOR/metrics.json")
    e.add_argument("--generator", default=str(settings.ASSETS / "generator"))
    e.add_argument("--n", type=int, default=60, help="held-out reports to generate from")
    e.add_argument("--n-sweep", type=int, default=24, help="reports per guidance scale of the sweep 0..10")
    e.add_argument("--steps", type=int, help="sampling steps (default: the U-Net config's)")
    e.add_argument("--guidance", type=float, default=5.0)
    e.add_argument("--ablation", help="a generator folder trained with --context-encoder minilm-mean")
    e.add_argument("--cache", help="phantom cache root holding test/ (default cache/ctclip-demo)")
    e.add_argument("--out", help="metrics.json path (default GENERATOR/metrics.json)")
    e.set_defaults(func=_generate_eval)


def _x2ct(args) -> int:
    from training.train_x2ct import X2CTTrainConfig, train
    cfg = X2CTTrainConfig.demo() if args.preset == "demo" else X2CTTrainConfig.paper()
    names = ("backbone", "steps", "batch_size", "lr", "seed", "alpha", "beta", "gamma", "finding_weight", "n_train",
             "n_test",
             "ctclip", "data_root", "reports_csv", "metadata_csv", "labels_csv")
    overrides = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.time_budget_min is not None:
        overrides["time_budget_s"] = 60.0 * args.time_budget_min
    for name in ("resnet_widths", "resnet_layers"):
        if getattr(args, name):
            overrides[name] = getattr(args, name)
    cfg = replace(cfg, **overrides)
    if cfg.preset == "paper" and not (cfg.ctclip and cfg.data_root and cfg.reports_csv and cfg.metadata_csv
                                      and cfg.labels_csv):
        print("error: the paper preset needs --ctclip, --data-root, --reports-csv, --metadata-csv and --labels-csv.",
              file=sys.stderr)
        return 2
    out = Path(args.out or settings.training_runs_dir() / f"x2ct-{cfg.preset}")
    summary = train(cfg, out, cache_root=args.cache, resume=args.resume)
    print(json.dumps(summary))
    return 0


def _x2ct_eval(args) -> int:
    from training.eval_x2ct import evaluate
    metrics = evaluate(Path(args.checkpoint), cache_root=args.cache, out=args.out)
    print(json.dumps({k: metrics[k] for k in ("zero_shot_macro_auroc", "ctclip_zero_shot_macro_auroc",
                                              "cxr_to_volume", "cxr_to_report") if k in metrics}))
    return 0


def _int_list(text: str) -> tuple[int, ...]:
    """"16,32,64,128" -> (16, 32, 64, 128): positive integers, for argparse."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _add_x2ct_parsers(sub) -> None:
    p = sub.add_parser("x2ct", help="train the X2CT-CLIP chest-radiograph encoder against the frozen CT CLIP")
    p.add_argument("--preset", choices=("demo", "paper"), default="demo")
    p.add_argument("--backbone", choices=("resnet", "swin"))
    p.add_argument("--resnet-widths", type=_int_list, metavar="W1,W2,W3,W4",
                   help="channels per ResNet stage, for a candidate run (default: the preset's; demo 32,64,128,256)")
    p.add_argument("--resnet-layers", type=_int_list, metavar="N1,N2,N3,N4",
                   help="blocks per ResNet stage, for a candidate run (default: the preset's; demo 1,1,1,1)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--alpha", type=float, help="weight of L(CT, report) (default 0; frozen, no gradient)")
    p.add_argument("--beta", type=float, help="weight of L(CXR, report) (default 1; 0 for the ablation)")
    p.add_argument("--gamma", type=float, help="weight of L(CXR, CT) (default 1; 0 for the ablation)")
    p.add_argument("--finding-weight", type=float,
                   help="weight of the finding term: BCE of the CT CLIP's zero-shot logits of the CXR latent against "
                   "the study's labels (demo default 3; paper default 0, the paper's loss)")
    p.add_argument("--n-train", type=int, help="training studies (demo: phantoms; default 400)")
    p.add_argument("--n-test", type=int, help="held-out test studies (demo: the CT CLIP's test seeds; default 300)")
    p.add_argument("--time-budget-min", type=float, help="stop after this many minutes of training")
    p.add_argument("--ctclip", help="CT CLIP checkpoint folder (default assets/ctclip; paper: the CT-CLIP_v2 folder)")
    p.add_argument("--out", help="run directory (default runs/x2ct-PRESET)")
    p.add_argument("--cache", help="DRR + latent cache directory (default cache/x2ct-PRESET)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--data-root", help="CT-RATE dataset root (paper)")
    p.add_argument("--reports-csv")
    p.add_argument("--metadata-csv")
    p.add_argument("--labels-csv")
    p.set_defaults(func=_x2ct)
    e = sub.add_parser("x2ct-eval", help="evaluate a CXR encoder on the held-out DRR split; writes metrics.json")
    e.add_argument("--checkpoint", default=str(settings.training_runs_dir() / "x2ct-demo" / "model"))
    e.add_argument("--cache", help="DRR + latent cache directory (default: the run's)")
    e.add_argument("--out", help="metrics.json path (default CHECKPOINT/metrics.json)")
    e.set_defaults(func=_x2ct_eval)


def _speech(args) -> int:
    from training.train_speech import SpeechTrainConfig, train
    cfg = SpeechTrainConfig.demo() if args.preset == "demo" else SpeechTrainConfig.paper()
    overrides = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                                   "seed": args.seed, "distill_weight": args.distill_weight,
                                   "n_studies": args.studies, "n_test_studies": args.test_studies,
                                   "n_real_studies": args.real_studies,
                                   "audio_dir": args.audio_dir, "ct_latents": args.ct_latents,
                                   "reports_csv": args.reports_csv, "cpu_threads": args.threads,
                                   "prompt_contrast_weight": args.prompt_contrast_weight,
                                   "prompt_ct_logit_weight": args.prompt_ct_logit_weight}.items()
                 if v is not None}
    if args.no_distill:
        overrides["distill_weight"] = 0.0
    if args.no_spoken_prompts:
        overrides["spoken_prompts"] = False
    if args.blended_prompt_voices:
        overrides["blended_prompt_voices"] = True
    if args.time_budget_min is not None:
        overrides["time_budget_s"] = 60.0 * args.time_budget_min
    if args.synthesis_budget_min is not None:
        overrides["synthesis_budget_cpu_s"] = 60.0 * args.synthesis_budget_min
    cfg = replace(cfg, **overrides)
    if args.synthesis_only:
        from engine.errors import UserError
        from training.train_speech import synthesize_demo_clips
        if cfg.preset != "demo":
            raise UserError("--synthesis-only makes the demo preset's clips; the paper preset reads --audio-dir.")
        budget = None if args.synthesis_budget_min is None else 60.0 * args.synthesis_budget_min
        made = synthesize_demo_clips(cfg, cache_root=args.cache, budget_cpu_s=budget, threads=cfg.cpu_threads or 2)
        print(json.dumps({"synthesis": made}))
        return 0
    out = Path(args.out or settings.training_runs_dir() / f"speech-{cfg.preset}")
    summary = train(cfg, out, cache_root=args.cache, resume=args.resume)
    print(json.dumps({k: v for k, v in summary.items() if k != "synthesis"} | {"synthesis": summary.get("synthesis")}))
    return 0


def _speech_eval(args) -> int:
    from training.eval_speech import evaluate
    budget = None if args.synthesis_budget_min is None else 60.0 * args.synthesis_budget_min
    metrics = evaluate(Path(args.checkpoint), cache_root=args.cache, out=args.out, n_test_studies=args.test_studies,
                       synthesis_budget_cpu_s=budget)
    print(json.dumps({k: v for k, v in metrics.items() if "recall" in k or "zero_shot" in k or k == "targets"}))
    if args.compare_no_distill:
        from training.eval_speech import add_comparison
        out = Path(args.out or Path(args.checkpoint) / "metrics.json")
        print(add_comparison(out, Path(args.compare_no_distill) / "metrics.json"))
    return 0


def _add_ctclip_parsers(sub) -> None:
    """ctclip, ctclip-eval, ctclip-ood, ctclip-export."""
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
    p.add_argument("--init-text-from", help="copy the text side of this CT CLIP directory and freeze it (every "
                   "text's latent computed once; token_features' default: assets/ctclip)")
    p.add_argument("--token-loss-weight", type=float, help="token-level BCE of the heat maps vs the focal masks")
    p.add_argument("--label-loss-weight", type=float, help="BCE of a linear label head on the latents")
    p.add_argument("--prompt-label-loss-weight", type=float,
                   help="BCE of the zero-shot rule itself (image latent vs the 36 prompts) against the labels")
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
    o = sub.add_parser("ctclip-ood", help="fit a CT CLIP checkpoint's out-of-distribution check (latent "
                       "statistics on training phantoms, threshold on held-out ones) and measure it")
    o.add_argument("--checkpoint", default=str(settings.ASSETS / "ctclip"))
    o.add_argument("--cache", help="phantom cache directory (default cache/ctclip-demo: its train/ and test/ are "
                   "reused when they hold enough studies; calibration/ holds seeds 800000 + i)")
    o.add_argument("--n-fit", type=int, default=1000, help="training phantoms the mean and covariance are fitted on")
    o.add_argument("--n-calibrate", type=int, default=400, help="held-out phantoms the threshold is calibrated on")
    o.add_argument("--n-test", type=int, default=300, help="ctclip-eval test studies whose flag rate is measured")
    o.add_argument("--quantile", type=float, default=0.99, help="threshold = this quantile of the held-out distances")
    o.add_argument("--workers", type=int, default=2, help="phantom rendering processes")
    o.set_defaults(func=_ctclip_ood)
    r = sub.add_parser("ctclip-text-reading", help="fit a CT CLIP checkpoint's reader of text and speech latents "
                       "(what a report states) on the training reports and measure it on the held-out ones")
    r.add_argument("--checkpoint", default=str(settings.ASSETS / "ctclip"))
    r.add_argument("--cache", help="phantom cache directory (default cache/ctclip-demo: train/ is fitted on, test/ "
                   "measured on)")
    r.add_argument("--n-test", type=int, default=320, help="held-out test studies whose reports are measured")
    r.set_defaults(func=_ctclip_text_reading)
    x = sub.add_parser("ctclip-export", help="copy a run's model to assets/ctclip (float16)")
    x.add_argument("--run", default=str(settings.training_runs_dir() / "ctclip-demo"))
    x.add_argument("--out", default=str(settings.ASSETS / "ctclip"))
    x.set_defaults(func=_ctclip_export)


def _add_speech_parsers(sub) -> None:
    """speech, speech-eval."""
    s = sub.add_parser("speech", help="train the speech encoder (SpeechCT-CLIP) against the frozen CT CLIP")
    s.add_argument("--preset", choices=("demo", "paper"), default="demo")
    s.add_argument("--steps", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--distill-weight", type=float, help="lambda of (1 - cos(audio, text teacher)); default 1.0")
    s.add_argument("--no-distill", action="store_true", help="the ablation: contrastive audio <-> CT only")
    s.add_argument("--no-spoken-prompts", action="store_true",
                   help="demo: leave out the 36 zero-shot prompts read by the training voices (distillation-only "
                   "clips; the shipped model before they existed was trained without them)")
    s.add_argument("--prompt-contrast-weight", type=float,
                   help="demo: weight of the spoken prompts' cross-entropy over the 36 prompt latents (default 1.0; "
                   "0 = distillation alone, as the model shipped before it)")
    s.add_argument("--prompt-ct-logit-weight", type=float,
                   help="demo: weight of the spoken prompts' squared logit error against the training CT latents "
                   "(default 0.5; 0 = off, as the model shipped before it)")
    s.add_argument("--blended-prompt-voices", action="store_true",
                   help="demo: the zero-shot prompts also read by 14 blends of two training voices (new speakers, "
                   "no evaluation voice; about 4 CPU minutes of Kokoro)")
    s.add_argument("--time-budget-min", type=float, help="stop training after this many minutes")
    s.add_argument("--synthesis-budget-min", type=float, help="demo: CPU minutes for new Kokoro clips (default 60)")
    s.add_argument("--studies", type=int, help="demo: training phantom studies (default 400)")
    s.add_argument("--test-studies", type=int, help="demo: held-out phantom studies (default 100)")
    s.add_argument("--real-studies", type=int,
                   help="demo: real CT-RATE reports read aloud for training, the first N rows of the report CSV "
                   "(default 800; the acceptance test's six are held out; 0 = none)")
    s.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a shared, oversubscribed CPU)")
    s.add_argument("--out", help="run directory (default runs/speech-PRESET)")
    s.add_argument("--cache", help="data cache (demo; default cache/speech-demo)")
    s.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    s.add_argument("--synthesis-only", action="store_true",
                   help="demo: render the phantom splits and make every training and evaluation clip (Kokoro, "
                   "espeak-ng) into the cache, then stop before any CT CLIP is loaded; resumable; no CPU limit "
                   "unless --synthesis-budget-min is given")
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
    v.add_argument("--compare-no-distill", metavar="DIR",
                   help="a --no-distill checkpoint already evaluated: write the paper's table (text teacher vs speech "
                   "without / with distillation) into this checkpoint's metrics.json as 'comparison'")
    v.set_defaults(func=_speech_eval)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training")
    sub = parser.add_subparsers(dest="stage", required=True)
    _add_ctclip_parsers(sub)
    _add_generator_stages(sub)
    _add_x2ct_parsers(sub)
    _add_speech_parsers(sub)
    args = parser.parse_args(argv)
    from engine.errors import UserError
    try:
        return args.func(args)
    except UserError as err:    # bad input (a missing checkpoint, another architecture...): one sentence, exit 2
        print(json.dumps({"error": str(err)}))
        return 2


if __name__ == "__main__":
    sys.exit(main())
