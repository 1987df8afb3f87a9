"""Fit a CT CLIP checkpoint's reader of text and speech latents (engine/text_reading.py) and measure it.

    python -m training ctclip-text-reading --checkpoint assets/ctclip [--cache DIR] [--n-test 320]

1. fit: the text latents of the TRAINING split's texts (CACHE/train: each phantom's report, the real CT-RATE
   report paired with a phantom where there is one, and a brief report of each phantom's labels, `brief_texts`, the
   way a prompt is typed), each with its study's 18 labels -> per label a logistic regression on the latent's 36
   prompt features. Short queries are left out: a query names at most two of its
   study's findings, so the study's labels are not what it states;
2. write CHECKPOINT/text_reading.json;
3. measure on the HELD-OUT test split's reports (CACHE/test, the ctclip-eval studies, never trained on), the raw image
   rule against the reader: labels marked above 0.5 per report against labels stated, the share of report-label
   pairs wrong at 0.5, the Brier score and the per-label AUROC; and the same for a per-label scaling of the pair's
   logit alone (Platt), the simpler reader this one was chosen over; and the image rule and the reader on brief
   reports of the held-out studies ("brief_reports"). Merged into CHECKPOINT/metrics.json under
   "text_reading" (every other key kept).
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


def brief_texts(labels: np.ndarray) -> list[str]:
    """One brief report per study (engine.report_writer.write_brief_report: its findings in a sentence each and the
    impression, no normal statements, as the Generate tab's examples are typed), stating exactly the study's labels
    (rows of `labels`, (n, 18) 0/1), findings drawn by engine.phantom.findings.sample_findings from rng([BRIEF_SEED,
    i])."""
    from engine.phantom.findings import sample_findings
    from engine.report_writer import write_brief_report

    out = []
    for i, row in enumerate(labels):
        rng = np.random.default_rng([BRIEF_SEED, i])
        out.append(write_brief_report(sample_findings([LABELS[j] for j in np.flatnonzero(row)], rng), rng).text)
    return out


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
    from engine.text_reading import TextReader, fit_text_reader, prompt_features
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

    held_latents = latents(test_texts, "test", "text latents (held-out reports)")
    train_brief = brief_texts(train_labels[[k == "report" for k in train_kinds]])
    test_brief = brief_texts(test_labels)
    held_brief_latents = latents(test_brief, "brief_test", "text latents (held-out brief reports)")
    fit = prompt_features(np.concatenate([latents(train_texts, "train", "text latents (fit: training reports)"),
                                          latents(train_brief, "brief_train", "text latents (fit: brief reports)")]),
                          pipeline.prompt_latents, scale)
    fit_labels = np.concatenate([train_labels, train_labels[[k == "report" for k in train_kinds]]])
    held = prompt_features(held_latents, pipeline.prompt_latents, scale)
    held_brief = prompt_features(held_brief_latents, pipeline.prompt_latents, scale)
    counts = {**{kind: train_kinds.count(kind) for kind in TEXT_KINDS}, "brief_report": len(train_brief)}
    prompts = all_zero_shot_prompts()
    reader = fit_text_reader(fit, fit_labels, prompts, info={
        "model_id": pipeline.model_id, "fit_cache": str(cache_root / "train"), "fit_texts": counts})
    reader.save(checkpoint)
    if TextReader.load(checkpoint, pipeline.model_id, prompts) is None:
        raise RuntimeError(f"the reader written to {checkpoint} does not load back")

    image_rule = zero_shot_probabilities(torch.from_numpy(held_latents), torch.from_numpy(pipeline.prompt_latents),
                                         scale).numpy()
    image_rule_brief = zero_shot_probabilities(torch.from_numpy(held_brief_latents),
                                               torch.from_numpy(pipeline.prompt_latents), scale).numpy()
    block = {"fit_texts": counts, "n_fit": len(fit), "test_cache": str(cache_root / "test"),
             "n_held_out_reports": len(test_texts),
             "image_rule": reading_measures(image_rule, test_labels),
             "pair_logit_platt": reading_measures(pair_platt(fit, fit_labels, held), test_labels),
             "reader": reading_measures(reader.probabilities(held), test_labels),
             "brief_reports": {"n": len(test_brief), "image_rule": reading_measures(image_rule_brief, test_labels),
                               "reader": reading_measures(reader.probabilities(held_brief), test_labels)},
             "seconds": time.time() - t0}
    merge_metrics_json(checkpoint / "metrics.json", "text_reading", block)
    return block
