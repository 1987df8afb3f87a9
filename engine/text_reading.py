"""What a report says, read from its latent: P(stated) of the 18 findings for a text or a speech latent.

The CT CLIP's zero-shot rule (a softmax over each label's prompt pair "X is present." / "X is not present." of
scale * cosine) is made for image latents, and its per-label thresholds (metrics.json) were chosen on image latents.
Applied to a report's text latent, or to a dictation's speech latent (distilled from the text latent), it says
"present" for most labels: on the 320 held-out phantom reports of the demo CT CLIP it marks 8.0 labels above 0.5 per
report while they state 3.2 (a third of the report-label pairs wrong), and its macro AUROC is only 0.83
(`python -m training ctclip-text-reading`; figures in the checkpoint's metrics.json, "text_reading"). Text latents
sit on the text side of the joint space, where the two prompts of a pair are both near and their difference says
little on its own.

The reading here stays a reading against the same cached label prompts (no transcript, no new text model): per label
a logistic regression over the text latent's cosines to all 36 prompt latents, scaled by the CT CLIP's logit scale,

    P(stated_l | latent) = sigmoid(w_l . (scale * cos(latent, prompts)) + b_l),      w_l in R^36,

fitted on the training split's texts (each phantom's report and the real CT-RATE reports paired with phantoms, with
their studies' labels; short queries are left out: a query names at most two of its study's findings). One label
reads the other labels' prompts too, which is what separates "the heart is enlarged" from its neighbours on the text
side. Measured on the same held-out reports: macro AUROC 0.996, 3.1 labels marked per report for 3.2 stated, 1.9 %
of report-label pairs wrong; a per-label scaling of the pair's logit alone (Platt) keeps the rule's 0.83 and marks
1.6 (docs/training.md).

The reader belongs to one checkpoint (its text encoder and prompts) and lives in its folder:
    text_reading.json   {"labels": {label: {"weights": [36], "intercept"}}, "prompts": [36], "model_id", fit details}
A folder without it (or with one fitted for other weights or other prompts) has no reader: callers then show the
image rule and say it is uncalibrated.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.labels import LABELS

TEXT_READING_JSON = "text_reading.json"


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


def fit_text_reader(features: np.ndarray, labels: np.ndarray, prompts: list[str], info: dict | None = None,
                    regularisation: float = 1.0) -> TextReader:
    """Logistic regression of each label (n, 18) 0/1 on the prompt features (n, 36), one label at a time (sklearn,
    L2 with C = `regularisation`). A label with one class only in the fit gets zero weights and the log-odds of its
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
    return TextReader(weights=weights, intercepts=intercepts, prompts=list(prompts),
                      info={"estimator": "sklearn.linear_model.LogisticRegression per label over the 36 prompt "
                                         "features", "C": regularisation, "n_fit": int(len(features)), **(info or {})})
