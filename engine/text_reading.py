"""What a report says, read from its latent: P(stated) of the 18 findings for a text or a speech latent.

The CT CLIP's zero-shot rule (a softmax over each label's prompt pair "X is present." / "X is not present." of
scale * cosine) is made for image latents, and its per-label thresholds (metrics.json) were chosen on image latents.
Applied to a report's text latent, or to a dictation's speech latent (distilled from the text latent), it says
"present" for most labels: on the 320 held-out phantom reports of the demo CT CLIP it marks 8.0 labels above 0.5 per
report while they state 3.2 (a third of the report-label pairs wrong), and its macro AUROC is only 0.83
(`python -m training ctclip-text-reading`; figures in the checkpoint's metrics.json, "text_reading"). Text latents
sit on the text side of the joint space, where the two prompts of a pair are both near and their difference says
little on its own.

Two readers, each a logistic regression per label, fitted on the training split's texts with their studies' labels
(`python -m training ctclip-text-reading`; figures in the checkpoint's metrics.json, "text_reading"):

- the prompt-feature reader, for SPEECH latents: over the latent's cosines to all 36 prompt latents, scaled by the CT
  CLIP's logit scale,

      P(stated_l | latent) = sigmoid(w_l . (scale * cos(latent, prompts)) + b_l),      w_l in R^36,

  fitted on each phantom's report, the real CT-RATE reports paired with phantoms and a brief report of each phantom
  (short queries are left out: a query names at most two of its study's findings). One label reads the other labels'
  prompts too, which is what separates "the heart is enlarged" from its neighbours on the text side.
- the latent reader, for TYPED AND WRITTEN TEXT: over the unit text latent itself (w_l in R^D), fitted on the same
  texts plus a typed prompt of each phantom (engine.report_writer.write_typed_prompt: short lists, single sentences,
  statements that absent findings are absent).

Why two (the shipped checkpoint, metrics.json "text_reading"): on 30 prompts typed by hand (training/
typed_prompts.json, not written by the report writer; 42 findings stated) the prompt-feature reader gets 33 of the
540 prompt-label pairs wrong, 32 of them findings marked that were not stated, and the latent reader 8 (the Generate
tab's first example now reads its three findings and nothing else; "Heart size within normal limits. Coronary artery
calcification." still reads as cardiomegaly); on typed prompts of the 320 held-out studies 5.3 % of pairs wrong
against 2.5 %, on their reports 1.9 % against 0.9 %. On SPEECH latents (espeak-ng readings of 40 held-out brief
reports, 40 typed prompts and the 30 typed by hand, through the shipped speech encoder) neither is clearly better:
8.3 / 11.4 / 8.1 % wrong for the prompt-feature reader, 7.8 / 10.6 / 8.1 % for the latent reader, and another fit of
the latent reader (same texts, features scaled by 10 and C = 1) read 10.8 / 12.1 / 10.0 %. The speech latent is the
text latent plus an error (cosine 0.6-0.8 to it); speech keeps the reader its figures (assets/speech/metrics.json,
"dictation_reading") were measured with. Each caller says what its latent is (CTClipPipeline.
text_reading_from_latent, `source`).

A reader belongs to one checkpoint (its text encoder and prompts) and lives in its folder:
    text_reading.json                  the prompt-feature reader: {"labels": {label: {"weights": [36], "intercept"}},
                                       "prompts": [36], "model_id", fit details}
    text_latent_reading.safetensors    the latent reader: "weights" (18, D), "intercepts" (18,) float32; metadata
                                       "info" (JSON: model_id, fit details)
A folder without them (or with ones fitted for other weights, prompts or latent size) lacks that reader: callers fall
back to the prompt-feature reader, and without that to the image rule, which they say is uncalibrated.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.labels import LABELS

TEXT_READING_JSON = "text_reading.json"                       # the prompt-feature reader (speech latents)
TEXT_LATENT_READING = "text_latent_reading.safetensors"       # the latent reader (typed and written text)
LATENT_READER_C = 100.0    # its L2 strength (sklearn C) on unit latents: chosen on held-out typed prompts (C 10 / 100)


def prompt_features(latents: np.ndarray, prompt_latents: np.ndarray, scale: float) -> np.ndarray:
    """The reader's input: scale * cosine of unit latents (n, D) to the prompt latents (18, 2, D) flattened in
    all_zero_shot_prompts() order (label by label, "present" then "not present") -> (n, 36)."""
    prompts = np.asarray(prompt_latents, np.float64).reshape(-1, prompt_latents.shape[-1])
    return scale * np.atleast_2d(np.asarray(latents, np.float64)) @ prompts.T


@dataclass(frozen=True)
class TextReader:
    """Per label, weights (18, 36) over the prompt features and intercepts (18,), CT-CLIP label order."""
    weights: np.ndarray
    intercepts: np.ndarray
    prompts: list[str]         # the 36 prompt sentences the features are cosines to (all_zero_shot_prompts())
    info: dict                 # model_id, texts used, estimator

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """P(stated) (n, 18) from prompt features (n, 36)."""
        z = np.atleast_2d(np.asarray(features, np.float64)) @ self.weights.T + self.intercepts
        return 1.0 / (1.0 + np.exp(-z))

    # ------------------------------------------------------------------------------------------------- files
    def save(self, directory: Path) -> None:
        labels = {label: {"weights": [float(w) for w in row], "intercept": float(b)}
                  for label, row, b in zip(LABELS, self.weights, self.intercepts)}
        document = {**self.info, "prompts": list(self.prompts), "labels": labels}
        (Path(directory) / TEXT_READING_JSON).write_text(json.dumps(document, indent=1) + "\n")

    @classmethod
    def load(cls, directory: Path | None, model_id: str | None = None,
             prompts: list[str] | None = None) -> "TextReader | None":
        """The reader of a checkpoint folder; None when it has none, when it is damaged, or when it was fitted for
        another model (model_id) or other prompts than `prompts`."""
        path = Path(directory) / TEXT_READING_JSON if directory is not None else None
        if path is None or not path.is_file():
            return None
        try:
            info = json.loads(path.read_text())
            per_label, saved_prompts = info.pop("labels"), list(info.pop("prompts"))
            weights = np.array([[float(w) for w in per_label[label]["weights"]] for label in LABELS])
            intercepts = np.array([float(per_label[label]["intercept"]) for label in LABELS])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if weights.shape != (len(LABELS), len(saved_prompts)) or not np.all(np.isfinite(weights)) \
                or not np.all(np.isfinite(intercepts)):
            return None
        if model_id is not None and info.get("model_id") not in (None, model_id):
            return None
        if prompts is not None and list(prompts) != saved_prompts:
            return None
        return cls(weights=weights, intercepts=intercepts, prompts=saved_prompts, info=info)


def _per_label_logistic(features: np.ndarray, labels: np.ndarray, regularisation: float):
    """Weights (18, F) and intercepts (18,) of one logistic regression per label on `features` (n, F) (sklearn, L2
    with C = `regularisation`). A label with one class only in the fit gets zero weights and the log-odds of its
    smoothed frequency: it reads that rate whatever the text says (the fit saw nothing to learn from)."""
    from sklearn.linear_model import LogisticRegression

    features, labels = np.asarray(features, np.float64), np.asarray(labels, np.int64)
    weights, intercepts = np.zeros((len(LABELS), features.shape[1])), np.zeros(len(LABELS))
    for j in range(len(LABELS)):
        y = labels[:, j]
        if y.min() == y.max():
            rate = (y.sum() + 0.5) / (len(y) + 1.0)
            intercepts[j] = np.log(rate / (1 - rate))
            continue
        model = LogisticRegression(C=regularisation, max_iter=5000).fit(features, y)
        weights[j], intercepts[j] = model.coef_[0], float(model.intercept_[0])
    return weights, intercepts


def fit_text_reader(features: np.ndarray, labels: np.ndarray, prompts: list[str], info: dict | None = None,
                    regularisation: float = 1.0) -> TextReader:
    """The prompt-feature reader: per label (n, 18) 0/1 a logistic regression on the prompt features (n, 36)."""
    weights, intercepts = _per_label_logistic(features, labels, regularisation)
    return TextReader(weights=weights, intercepts=intercepts, prompts=list(prompts),
                      info={"estimator": "sklearn.linear_model.LogisticRegression per label over the 36 prompt "
                                         "features", "C": regularisation, "n_fit": int(len(features)), **(info or {})})


# ---------------------------------------------------------------------------------------------- the latent reader
@dataclass(frozen=True)
class LatentReader:
    """The reader of typed and written text: per label a logistic regression on the unit text latent itself,
    P(stated_l) = sigmoid(w_l . latent + b_l), weights (18, D), CT-CLIP label order."""
    weights: np.ndarray
    intercepts: np.ndarray
    info: dict                 # model_id, texts used, estimator, C

    def probabilities(self, latents: np.ndarray) -> np.ndarray:
        """P(stated) (n, 18) from unit text latents (n, D) (or one latent (D,))."""
        z = np.atleast_2d(np.asarray(latents, np.float64)) @ self.weights.T + self.intercepts
        return 1.0 / (1.0 + np.exp(-z))

    def save(self, directory: Path) -> None:
        from safetensors.numpy import save_file

        save_file({"weights": self.weights.astype(np.float32), "intercepts": self.intercepts.astype(np.float32)},
                  str(Path(directory) / TEXT_LATENT_READING), metadata={"info": json.dumps(self.info)})

    @classmethod
    def load(cls, directory: Path | None, model_id: str | None = None,
             latent_dim: int | None = None) -> "LatentReader | None":
        """The latent reader of a checkpoint folder; None when it has none, when it is damaged, or when it was fitted
        for another model (model_id) or another latent size."""
        path = Path(directory) / TEXT_LATENT_READING if directory is not None else None
        if path is None or not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                info = json.loads((f.metadata() or {}).get("info", "{}"))
                weights = np.asarray(f.get_tensor("weights"), np.float64)
                intercepts = np.asarray(f.get_tensor("intercepts"), np.float64)
        except Exception:          # safetensors raises its own error types for a damaged file: any means damaged
            return None
        if weights.ndim != 2 or weights.shape[0] != len(LABELS) or intercepts.shape != (len(LABELS),) \
                or not np.all(np.isfinite(weights)) or not np.all(np.isfinite(intercepts)):
            return None
        if latent_dim is not None and weights.shape[1] != latent_dim:
            return None
        if model_id is not None and info.get("model_id") not in (None, model_id):
            return None
        return cls(weights=weights, intercepts=intercepts, info=info)


def fit_latent_reader(latents: np.ndarray, labels: np.ndarray, info: dict | None = None,
                      regularisation: float = LATENT_READER_C) -> LatentReader:
    """The latent reader: per label (n, 18) 0/1 a logistic regression on the unit text latents (n, D)."""
    weights, intercepts = _per_label_logistic(latents, labels, regularisation)
    return LatentReader(weights=weights, intercepts=intercepts,
                        info={"estimator": "sklearn.linear_model.LogisticRegression per label over the unit text "
                                           "latent", "C": regularisation, "n_fit": int(len(latents)), **(info or {})})
