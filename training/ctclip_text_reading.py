"""Fit a CT CLIP checkpoint's readers of text and speech latents (engine/text_reading.py) and measure them.

    python -m training ctclip-text-reading --checkpoint assets/ctclip [--cache DIR] [--n-test 320]

1. fit, on the TRAINING split's texts (CACHE/train), each with its study's 18 labels:
   - the prompt-feature reader (speech latents) on each phantom's report, the real CT-RATE report paired with a
     phantom where there is one, and a brief report of each phantom's labels (`brief_texts`), per label a logistic
     regression on the latent's 36 prompt features;
   - the latent reader (typed and written text) on the same texts and a typed prompt of each phantom's labels
     (`typed_texts`: engine.report_writer.write_typed_prompt), per label a logistic regression on the latent itself.
   Short queries are left out: a query names at most two of its study's findings, so the study's labels are not what
   it states;
2. write CHECKPOINT/text_reading.json and CHECKPOINT/text_latent_reading.safetensors;
3. measure on the HELD-OUT test split (CACHE/test, the ctclip-eval studies, never trained on) the raw image rule, a
   per-label scaling of the pair's logit alone (Platt, the simplest reader), the prompt-feature reader and the latent
   reader: labels marked above 0.5 per text against labels stated, the share of text-label pairs wrong at 0.5, the
   Brier score and the per-label AUROC, on the held-out reports ("reader" is the prompt-feature reader there, as
   before), on brief reports of the held-out studies ("brief_reports"), on typed prompts of the held-out studies
   ("typed_prompts") and on 30 prompts typed by hand with their findings (training/typed_prompts.json, written for
   this check, not by the report writer: "typed_by_hand"). Merged into CHECKPOINT/metrics.json under "text_reading"
   (every other key kept).
Text latents come from CTClipPipeline.embed_texts, the path the CLI and the app use (kept in
CACHE/text_latents_<split>_<model_id>.npz: the long reports take minutes to encode), the prompt features from
engine.text_reading.prompt_features with the pipeline's own prompt latents and logit scale.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch

from engine.labels import LABELS
from engine.settings import training_cache_dir

TEXT_KINDS = ("report", "real_report")   # what a training record says about its whole study (not its query)
BRIEF_SEED = 7_300_001                    # rng([BRIEF_SEED, i]) writes study i's brief report
TYPED_SEED = 7_400_001                    # rng([TYPED_SEED, i]) writes study i's typed prompt
TYPED_BY_HAND = Path(__file__).with_name("typed_prompts.json")   # [{"text", "labels": [label names]}]


def _written_texts(labels: np.ndarray, seed: int, write) -> list[str]:
    """One text per study stating exactly its labels (rows of `labels`, (n, 18) 0/1): findings drawn by
    engine.phantom.findings.sample_findings from rng([seed, i]), then written by `write(findings, rng)`."""
    from engine.phantom.findings import sample_findings

    out = []
    for i, row in enumerate(labels):
        rng = np.random.default_rng([seed, i])
        out.append(write(sample_findings([LABELS[j] for j in np.flatnonzero(row)], rng), rng))
    return out


def brief_texts(labels: np.ndarray) -> list[str]:
    """One brief report per study (engine.report_writer.write_brief_report: its findings in a sentence each and the
    impression, no normal statements, as the Generate tab's examples are typed), stating exactly the study's labels."""
    from engine.report_writer import write_brief_report

    return _written_texts(labels, BRIEF_SEED, lambda findings, rng: write_brief_report(findings, rng).text)


def typed_texts(labels: np.ndarray) -> list[str]:
    """One typed prompt per study (engine.report_writer.write_typed_prompt), stating exactly the study's labels."""
    from engine.report_writer import write_typed_prompt

    return _written_texts(labels, TYPED_SEED, write_typed_prompt)


def typed_by_hand() -> tuple[list[str], np.ndarray]:
    """(texts, labels (30, 18) 0/1) of the prompts typed by hand in training/typed_prompts.json."""
    import json

    items = json.loads(TYPED_BY_HAND.read_text())
    unknown = {label for item in items for label in item["labels"]} - set(LABELS)
    if unknown:
        raise ValueError(f"{TYPED_BY_HAND} names labels that are not CT-RATE's: {sorted(unknown)}")
    return ([item["text"] for item in items],
            np.array([[int(label in item["labels"]) for label in LABELS] for item in items], dtype=np.int64))


def cache_texts(cache, kinds=TEXT_KINDS, n: int | None = None) -> tuple[list[str], np.ndarray, list[str]]:
    """(texts, labels (n, 18) 0/1, kind of each text) of the first `n` (default every) finished studies of a
    PhantomCache."""
    labels = cache.label_matrix()
    texts, rows, kind_of = [], [], []
    for i, record in enumerate(cache.records[:n]):
        for kind in kinds:
            if record.get(kind):
                texts.append(record[kind])
                rows.append(labels[i])
                kind_of.append(kind)
    return texts, np.array(rows, dtype=np.int64).reshape(-1, len(LABELS)), kind_of


def text_latents(pipeline, texts: list[str], store: Path, batch_size: int = 32, progress: bool = True,
                 desc: str = "text latents") -> np.ndarray:
    """Unit text latents (n, D) by the pipeline's own path, kept in `store` (reused when it holds the same texts)."""
    from tqdm import tqdm

    digest = hashlib.sha1("\x00".join(texts).encode()).hexdigest()
    if store.is_file():
        saved = np.load(store)
        if str(saved["digest"]) == digest:
            return saved["latents"]
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=not progress):
        out.append(pipeline.embed_texts(texts[start:start + batch_size], batch_size=batch_size))
    latents = np.concatenate(out) if out else np.zeros((0, pipeline.prompt_latents.shape[-1]), np.float32)
    np.savez(store, latents=latents, digest=digest)
    return latents


def reading_measures(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    """How a reading of texts compares with what they state: mean labels above 0.5 against mean labels stated, the
    share of text-label pairs read wrongly at 0.5, the Brier score, macro AUROC over the labels with both classes."""
    from training.evaluate import auroc

    marked = probabilities > 0.5
    aurocs = [auroc(labels[:, j], probabilities[:, j]) for j in range(labels.shape[1])]
    return {"labels_marked_per_text": float(marked.sum(1).mean()),
            "labels_stated_per_text": float(labels.sum(1).mean()),
            "error_rate_at_half": float(np.mean(marked != labels.astype(bool))),
            "brier": float(np.mean((probabilities - labels) ** 2)),
            "macro_auroc": float(np.nanmean(aurocs)),
            "per_label_auroc": dict(zip(LABELS, aurocs))}


def pair_platt(fit_features: np.ndarray, fit_labels: np.ndarray, features: np.ndarray) -> np.ndarray:
    """The simpler reader, for the comparison: per label a logistic regression on its own pair's logit alone."""
    from sklearn.linear_model import LogisticRegression

    out = np.zeros((len(features), len(LABELS)))
    for j in range(len(LABELS)):
        pair = lambda f: f[:, 2 * j:2 * j + 1] - f[:, 2 * j + 1:2 * j + 2]  # noqa: E731
        out[:, j] = LogisticRegression(max_iter=5000).fit(pair(fit_features), fit_labels[:, j]).predict_proba(
            pair(features))[:, 1]
    return out


def fit_text_reading(checkpoint: Path, cache_root: Path | None = None, n_test: int = 320,
                     progress: bool = True) -> dict:
    """Steps 1-3 of the module docstring. Returns the "text_reading" block merged into CHECKPOINT/metrics.json."""
    from engine.errors import UserError
    from engine.models.ctclip import all_zero_shot_prompts, zero_shot_probabilities
    from engine.pipelines.ctclip import CTClipPipeline
    from engine.text_reading import (LatentReader, TextReader, fit_latent_reader, fit_text_reader,
                                     prompt_features)
    from training.ctclip_data import PhantomCache
    from training.evaluate import merge_metrics_json

    t0 = time.time()
    checkpoint = Path(checkpoint)
    cache_root = Path(cache_root or training_cache_dir() / "ctclip-demo")
    for split in ("train", "test"):
        if not (cache_root / split / "meta.json").is_file():
            raise UserError(f"No phantom cache in '{cache_root / split}': build it with 'python -m training ctclip "
                            "--preset demo' (train) and 'python -m training ctclip-eval' (test) first.")
    pipeline = CTClipPipeline.from_pretrained(checkpoint)
    train_texts, train_labels, train_kinds = cache_texts(PhantomCache(cache_root / "train"))
    test_texts, test_labels, _ = cache_texts(PhantomCache(cache_root / "test"), kinds=("report",), n=n_test)
    scale = float(pipeline.model.logit_scale.detach())

    def latents(texts, split, desc):
        return text_latents(pipeline, texts, cache_root / f"text_latents_{split}_{pipeline.model_id}.npz",
                            progress=progress, desc=desc)

    report_rows = [k == "report" for k in train_kinds]
    train_latents = latents(train_texts, "train", "text latents (fit: training reports)")
    train_brief_latents = latents(brief_texts(train_labels[report_rows]), "brief_train",
                                  "text latents (fit: brief reports)")
    train_typed_latents = latents(typed_texts(train_labels[report_rows]), "typed_train",
                                  "text latents (fit: typed prompts)")
    held = {"reports": (latents(test_texts, "test", "text latents (held-out reports)"), test_labels),
            "brief_reports": (latents(brief_texts(test_labels), "brief_test", "text latents (held-out brief)"),
                              test_labels),
            "typed_prompts": (latents(typed_texts(test_labels), "typed_test", "text latents (held-out typed)"),
                              test_labels)}
    hand_texts, hand_labels = typed_by_hand()
    held["typed_by_hand"] = (pipeline.embed_texts(hand_texts), hand_labels)

    # 1-2. the prompt-feature reader (reports, real reports, brief) and the latent reader (the same and typed)
    features = lambda x: prompt_features(x, pipeline.prompt_latents, scale)  # noqa: E731
    fit_latents = np.concatenate([train_latents, train_brief_latents])
    fit_labels = np.concatenate([train_labels, train_labels[report_rows]])
    counts = {**{kind: train_kinds.count(kind) for kind in TEXT_KINDS}, "brief_report": int(sum(report_rows))}
    prompts = all_zero_shot_prompts()
    info = {"model_id": pipeline.model_id, "fit_cache": str(cache_root / "train")}
    reader = fit_text_reader(features(fit_latents), fit_labels, prompts, info={**info, "fit_texts": counts})
    reader.save(checkpoint)
    latent_fit_labels = np.concatenate([fit_labels, train_labels[report_rows]])
    latent_counts = {**counts, "typed_prompt": int(sum(report_rows))}
    latent_reader = fit_latent_reader(np.concatenate([fit_latents, train_typed_latents]), latent_fit_labels,
                                      info={**info, "fit_texts": latent_counts})
    latent_reader.save(checkpoint)
    if TextReader.load(checkpoint, pipeline.model_id, prompts) is None or \
            LatentReader.load(checkpoint, pipeline.model_id, fit_latents.shape[1]) is None:
        raise RuntimeError(f"a reader written to {checkpoint} does not load back")

    # 3. measured on held-out texts
    def readings(x: np.ndarray, labels: np.ndarray, platt: bool = False) -> dict:
        rule = zero_shot_probabilities(torch.from_numpy(x), torch.from_numpy(pipeline.prompt_latents), scale).numpy()
        out = {"n": int(len(x)), "image_rule": reading_measures(rule, labels)}
        if platt:
            out["pair_logit_platt"] = reading_measures(pair_platt(features(fit_latents), fit_labels, features(x)),
                                                       labels)
        out["reader"] = reading_measures(reader.probabilities(features(x)), labels)
        out["latent_reader"] = reading_measures(latent_reader.probabilities(x), labels)
        return out

    block = {"fit_texts": counts, "n_fit": len(fit_latents), "latent_reader_fit_texts": latent_counts,
             "n_fit_latent_reader": len(latent_fit_labels), "latent_reader_C": latent_reader.info["C"],
             "test_cache": str(cache_root / "test"), "n_held_out_reports": len(test_texts),
             **{k: v for k, v in readings(*held["reports"], platt=True).items() if k != "n"},
             **{name: readings(*held[name]) for name in ("brief_reports", "typed_prompts", "typed_by_hand")},
             "seconds": time.time() - t0}
    merge_metrics_json(checkpoint / "metrics.json", "text_reading", block)
    return block
