"""How much of the 18 labels the frozen per-token features of engine/token_features.py carry (issue 12).

    PYTHONPATH=. python -m training.probe_token_features render --n-train 600 --n-test 300   # phantoms -> features
    PYTHONPATH=. python -m training.probe_token_features probe                              # linear probes by group
    PYTHONPATH=. python -m training.probe_token_features learned --minutes 4               # tiny token model
    PYTHONPATH=. python -m training.probe_token_features cost                               # CPU s per volume

`render` draws phantoms with engine.phantom.make_study on the demo grid (label sets from CT-RATE's table) with seeds
of their own (TRAIN_SEED_BASE / TEST_SEED_BASE below: neither the training cache's < 1,000,000 nor the demo
library's 1,000,000+ range), computes token_features (demo preset) in 2 worker processes and caches them as
{cache}/{split}.npz: features (N, t, h, w, F) float32, labels (N, 18) bool, seeds (N,), seconds (N,) CPU seconds of
token_features per volume.

`probe`: per feature group, study-level features = mean and max over the 512 tokens, standardised, an L2 logistic
regression per label fitted on the train split (training.evaluate.linear_probe_auroc, the same probe that measured
the shipped encoder's image latents at 0.803), AUROC on the held-out split.

`learned`: a tiny token model (per-token MLP + position embedding + one attention-pooling query per label) trained
with BCE on the 18 labels over the cached (512, F) token sets; held-out AUROC and seconds per step.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.labels import LABEL_INDEX, LABELS
from engine.token_features import FEATURE_NAMES, TokenFeatureConfig, feature_names, token_features

TRAIN_SEED_BASE = 3_000_000
TEST_SEED_BASE = 3_100_000
DEFAULT_CACHE = Path("/tmp/token_features_probe")
FEATURES_TAG = "demo preset, Hessian in-plane stride 2 from sigma 1.4 voxels"   # change when the features' values do
REPORTED_LABELS = ("Lung nodule", "Emphysema", "Pulmonary fibrotic sequela", "Medical material",
                   "Arterial wall calcification", "Coronary artery wall calcification", "Lymphadenopathy")


# ------------------------------------------------------------------------------------------------ render

def _render_one(job: tuple[int, str]):
    """One phantom -> (seed, label vector, token features, CPU seconds of token_features) or None if not drawable.

    Kept in {volume_dir}/{seed}.npz: the volume (HU rounded to int16), its labels and its features, so that a larger
    run or a new feature set reuses what is done (a file with other feature names is featurised again)."""
    from engine.errors import UserError
    from engine.phantom import make_study
    seed, volume_dir = job
    stored = Path(volume_dir) / f"{seed}.npz"
    try:
        with np.load(stored) as z:
            stored_data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError):                     # not rendered yet, or cut short by a stopped run
        stored_data = None
    if stored_data is not None and str(stored_data.get("features_tag", "")) == FEATURES_TAG \
            and list(stored_data.get("feature_names", [])) == FEATURE_NAMES:
        return seed, stored_data["labels"], stored_data["features"], float(stored_data["seconds"])
    if stored_data is not None:
        hu, spacing, labels = stored_data["hu"].astype(np.float32), tuple(stored_data["spacing"]), stored_data["labels"]
    else:
        try:
            study = make_study(seed, with_report=False)
        except (UserError, ValueError, IndexError, RuntimeError):
            return None
        labels = np.zeros(len(LABELS), bool)
        labels[[LABEL_INDEX[name] for name in study.labels]] = True
        hu, spacing = np.round(study.volume.array), study.volume.spacing
    start = time.process_time()
    features = token_features(hu, spacing)
    seconds = time.process_time() - start
    partial = stored.with_suffix(".partial.npz")
    np.savez(partial, hu=hu.astype(np.int16), spacing=np.array(spacing), labels=labels, features=features,
             seconds=seconds, feature_names=np.array(FEATURE_NAMES), features_tag=FEATURES_TAG)
    partial.rename(stored)
    return seed, labels, features, seconds


def render_split(split: str, n: int, cache: Path, workers: int = 2) -> Path:
    """Render n phantoms of a split (or reload their stored volumes) and cache their token features."""
    base = TRAIN_SEED_BASE if split == "train" else TEST_SEED_BASE
    volume_dir = cache / "volumes"
    volume_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(seed, str(volume_dir)) for seed in range(base, base + n)]
    rows = []
    with mp.get_context("spawn").Pool(workers) as pool:
        for i, row in enumerate(pool.imap(_render_one, jobs, chunksize=4)):
            if row is not None:
                rows.append(row)
            if (i + 1) % 50 == 0:
                print(f"{split}: {i + 1}/{n}", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{split}.npz"
    np.savez(path, seeds=np.array([r[0] for r in rows]), labels=np.stack([r[1] for r in rows]),
             features=np.stack([r[2] for r in rows]), seconds=np.array([r[3] for r in rows]),
             feature_names=np.array(FEATURE_NAMES))
    return path


def load_split(cache: Path, split: str) -> dict:
    with np.load(cache / f"{split}.npz") as z:
        data = {k: z[k] for k in z.files}
    if list(data["feature_names"]) != FEATURE_NAMES:
        raise SystemExit(f"{cache / split}.npz was computed with other features; render again")
    return data


# ------------------------------------------------------------------------------------------------ linear probes

def feature_groups() -> dict[str, list[str]]:
    """Named subsets of FEATURE_NAMES, from the cheapest to the full set."""
    names = FEATURE_NAMES
    shares = [n for n in names if n.startswith(("share_", "logshare_"))]
    stats = [n for n in names if n.startswith("hu_")]
    shape = [n for n in names if n.split("_s")[0] in ("blob", "tube", "plate", "dark_blob", "log", "edge")]
    return {
        "HU window shares": shares,
        "shares + HU statistics": shares + stats,
        "Hessian / LoG / edges only (3 scales)": shape,
        "shares + statistics + Hessian (3 scales)": shares + stats + shape,
        "shares + statistics + Hessian 2.5 mm": shares + stats + [n for n in shape if "_s2.5_" in n],
        "fast preset": feature_names(TokenFeatureConfig.fast()),
        "full demo preset": names,
    }


def study_pooled(features: np.ndarray, columns: list[int]) -> np.ndarray:
    """(N, t, h, w, F) -> (N, 2 * len(columns)): mean and max over tokens."""
    tokens = features[..., columns].reshape(len(features), -1, len(columns))
    return np.concatenate([tokens.mean(axis=1), tokens.max(axis=1)], axis=1)


def run_probes(cache: Path) -> dict:
    from training.evaluate import linear_probe_auroc
    train, test = load_split(cache, "train"), load_split(cache, "test")
    results = {}
    for group, names in feature_groups().items():
        columns = [FEATURE_NAMES.index(n) for n in names]
        probe = linear_probe_auroc(study_pooled(test["features"], columns), test["labels"],
                                   fit_features=study_pooled(train["features"], columns), fit_labels=train["labels"])
        results[group] = {"n_features": len(names), "macro": probe["macro"], "per_label": probe["per_label"]}
        print(f"{group:45s} F={len(names):3d} macro {probe['macro']:.3f}  " + "  ".join(
            f"{lab[:12]} {probe['per_label'][lab]:.2f}" for lab in REPORTED_LABELS), flush=True)
    results["_meta"] = {"n_train": int(len(train["labels"])), "n_test": int(len(test["labels"])),
                        "token_features_cpu_seconds_median": float(np.median(np.r_[train["seconds"],
                                                                                    test["seconds"]]))}
    return results


# ------------------------------------------------------------------------------------------------ cost

def cost_per_group(cache: Path, n_volumes: int = 5, repeats: int = 3) -> dict:
    """Median CPU seconds (time.process_time, one thread) of token_features per volume, per configuration."""
    from dataclasses import replace
    base = replace(TokenFeatureConfig.demo(), hessian_sigmas_mm=(), texture_sigmas_mm=())
    configs = {"shares + HU statistics": base}
    for s in TokenFeatureConfig.demo().hessian_sigmas_mm:
        configs[f"shares + statistics + Hessian {s:g} mm"] = replace(base, hessian_sigmas_mm=(s,))
    for s in TokenFeatureConfig.demo().texture_sigmas_mm:
        configs[f"shares + statistics + texture {s:g} mm"] = replace(base, texture_sigmas_mm=(s,))
    configs["fast preset"] = TokenFeatureConfig.fast()
    configs["full demo preset"] = TokenFeatureConfig.demo()
    volumes = []
    for path in sorted((cache / "volumes").glob("*[0-9].npz"))[:n_volumes]:
        with np.load(path) as z:
            volumes.append((z["hu"].astype(np.float32), tuple(z["spacing"])))
    result = {}
    for name, config in configs.items():
        seconds = []
        for hu, spacing in volumes:
            for _ in range(repeats):
                start = time.process_time()
                token_features(hu, spacing, config)
                seconds.append(time.process_time() - start)
        result[name] = {"cpu_seconds_median": float(np.median(seconds)), "n_features": len(feature_names(config))}
        print(f"{name:45s} F={len(feature_names(config)):3d} {np.median(seconds):.3f} s", flush=True)
    return result


# ------------------------------------------------------------------------------------------------ learned model

def run_learned(cache: Path, minutes: float, group: str = "full demo preset", seed: int = 0) -> dict:
    """Train the tiny token model on one feature group (a key of feature_groups()) for `minutes` of wall time;
    held-out AUROC per label and seconds per step."""
    from training.evaluate import auroc
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    train, test = load_split(cache, "train"), load_split(cache, "test")
    columns = [FEATURE_NAMES.index(n) for n in feature_groups()[group]]
    x_train = torch.as_tensor(train["features"][..., columns]).flatten(1, 3)             # (N, 512, F)
    mean, std = x_train.mean((0, 1)), x_train.std((0, 1)) + 1e-6
    x_train = (x_train - mean) / std
    x_test = (torch.as_tensor(test["features"][..., columns]).flatten(1, 3) - mean) / std
    y_train = torch.as_tensor(train["labels"], dtype=torch.float32)
    model = TokenLabelModel(x_train.shape[-1], x_train.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    rng = np.random.default_rng(seed)
    steps, start, deadline = 0, time.perf_counter(), time.perf_counter() + 60 * minutes
    while time.perf_counter() < deadline:
        batch = torch.as_tensor(rng.choice(len(x_train), 32, replace=False))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x_train[batch]), y_train[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    seconds_per_step = (time.perf_counter() - start) / steps
    model.eval()
    with torch.no_grad():
        scores = model(x_test).numpy()
    per_label = {name: auroc(test["labels"][:, j], scores[:, j]) for j, name in enumerate(LABELS)}
    macro = float(np.nanmean(list(per_label.values())))
    print(f"learned token model on {group}: {steps} steps, {seconds_per_step * 1000:.1f} ms/step, macro {macro:.3f}  " +
          "  ".join(f"{lab[:12]} {per_label[lab]:.2f}" for lab in REPORTED_LABELS), flush=True)
    return {"group": group, "n_features": len(columns), "steps": steps, "seconds_per_step": seconds_per_step,
            "macro": macro, "per_label": per_label}


class TokenLabelModel(nn.Module):
    """Per-token MLP (F -> 64) + learned position embedding, then one attention-pooling query per label (so each
    label looks at its own tokens: that label's heat map) and a linear read-out per label. (B, T, F) -> (B, L)."""

    def __init__(self, n_features: int, n_tokens: int, dim: int = 64, n_labels: int = len(LABELS)):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(n_features, dim), nn.GELU(), nn.Linear(dim, dim))
        self.position = nn.Parameter(torch.zeros(n_tokens, dim))
        self.queries = nn.Parameter(torch.randn(n_labels, dim) * dim ** -0.5)
        self.readout = nn.Parameter(torch.zeros(n_labels, dim))
        self.bias = nn.Parameter(torch.zeros(n_labels))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.position                                       # (B, T, D)
        attention = torch.softmax(torch.einsum("btd,ld->blt", h, self.queries), dim=-1)
        pooled = torch.einsum("blt,btd->bld", attention, h)
        return (pooled * self.readout).sum(-1) + self.bias


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("render", "probe", "learned", "cost"))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--group", default="full demo preset", help="feature group for `learned`")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch order of `learned`")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.command == "render":
        for split, n in (("test", args.n_test), ("train", args.n_train)):      # held-out first: a run cut short
            # can still be probed with the train studies done so far (render again with a smaller --n-train)
            print(render_split(split, n, args.cache, args.workers), flush=True)
        return
    if args.command == "cost":
        results = cost_per_group(args.cache)
    else:
        results = run_probes(args.cache) if args.command == "probe" else run_learned(args.cache, args.minutes, args.group, args.seed)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
