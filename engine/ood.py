"""Out-of-distribution check of the CT CLIP image latent: is this scan like the phantoms the model learned from?

The demo CT CLIP learned from simulated phantom CTs only; on a scan unlike them (a real CT, a foreign volume) its
zero-shot bars are numbers without meaning. The check measures how far the scan's unit image latent x lies from the
training latents, by the Mahalanobis distance

    d(x) = sqrt((x - mean)^T  P  (x - mean)),     P = inverse of the training latents' covariance,

with mean and covariance fitted on training-split phantom latents (Ledoit-Wolf shrinkage: a 256-dimensional
covariance from about a thousand studies needs it to be invertible and stable). The threshold is a chosen quantile
(default the 99th percentile) of d over HELD-OUT phantoms (seeds never trained on and never used for the fit), so by
construction about 1 % of unseen phantoms are flagged. The answer's `ood_score` is d / threshold: below 1 the scan is
in distribution, above 1 it is flagged (2.0 = twice as far from the training phantoms as the threshold).

The statistics belong to one checkpoint and live in its folder, written by `python -m training ctclip-ood`:
    latent_statistics.safetensors   "mean" (D,) and "precision" (D, D), float32
    latent_statistics.json          threshold, quantile, estimator, shrinkage, studies used (seeds), the model_id
A folder without them (or whose statistics were fitted for other weights) answers in_distribution null: unknown.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

STATISTICS_TENSORS = "latent_statistics.safetensors"
STATISTICS_JSON = "latent_statistics.json"

OUT_OF_DISTRIBUTION_WARNING = ("This scan does not look like the studies the CT CLIP learned from (ood_score "
                               "{score:.2f}, above 1); its zero-shot probabilities should not be read as findings.")


@dataclass(frozen=True)
class DistributionCheck:
    """The answer of the check for one latent. in_distribution None: the checkpoint has no statistics (unknown)."""
    in_distribution: bool | None
    ood_score: float | None        # Mahalanobis distance / calibrated threshold (> 1: flagged); None when unknown
    distance: float | None = None  # the Mahalanobis distance itself (latent units)

    @property
    def flagged(self) -> bool:
        return self.in_distribution is False

    @property
    def warning(self) -> str | None:
        """One sentence for a flagged scan, else None."""
        return OUT_OF_DISTRIBUTION_WARNING.format(score=self.ood_score) if self.flagged else None

    def to_json(self) -> dict:
        """{"in_distribution": true|false|null, "ood_score": float|null}: the fields every CT answer carries."""
        return {"in_distribution": self.in_distribution,
                "ood_score": None if self.ood_score is None else round(self.ood_score, 4)}


UNKNOWN = DistributionCheck(in_distribution=None, ood_score=None)


@dataclass(frozen=True)
class LatentStatistics:
    """Mean (D,) and precision matrix (D, D) of the training latents, and the calibrated distance threshold."""
    mean: np.ndarray
    precision: np.ndarray
    threshold: float
    info: dict                     # the rest of latent_statistics.json (quantile, counts, seeds, estimator, model_id)

    def distances(self, latents: np.ndarray) -> np.ndarray:
        """Mahalanobis distances (N,) of latents (N, D) (or one latent (D,) -> (1,)) to the training mean."""
        from scipy.spatial.distance import cdist

        x = np.atleast_2d(np.asarray(latents, dtype=np.float64))
        return cdist(x, self.mean[None].astype(np.float64), metric="mahalanobis",
                     VI=self.precision.astype(np.float64))[:, 0]

    def check(self, latent: np.ndarray) -> DistributionCheck:
        """The check of one latent (D,): flagged when its distance exceeds the threshold."""
        distance = float(self.distances(latent)[0])
        score = distance / self.threshold
        return DistributionCheck(in_distribution=bool(score <= 1.0), ood_score=score, distance=distance)

    # ------------------------------------------------------------------------------------------------- files
    def save(self, directory: Path) -> None:
        """Write the two files into a checkpoint folder (the tensors in float32)."""
        from safetensors.numpy import save_file

        directory = Path(directory)
        save_file({"mean": np.ascontiguousarray(self.mean, dtype=np.float32),
                   "precision": np.ascontiguousarray(self.precision, dtype=np.float32)},
                  str(directory / STATISTICS_TENSORS))
        (directory / STATISTICS_JSON).write_text(json.dumps({**self.info, "threshold": self.threshold}, indent=1)
                                                 + "\n")

    @classmethod
    def load(cls, directory: Path | None, model_id: str | None = None) -> "LatentStatistics | None":
        """The statistics of a checkpoint folder; None when it has none, when they are damaged, or when they were
        fitted for another model (their model_id differs from `model_id`): the check then answers unknown."""
        if directory is None:
            return None
        tensors, numbers = Path(directory) / STATISTICS_TENSORS, Path(directory) / STATISTICS_JSON
        if not (tensors.is_file() and numbers.is_file()):
            return None
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            info = json.loads(numbers.read_text())
            state = load_file(str(tensors))
            mean, precision, threshold = state["mean"], state["precision"], float(info.pop("threshold"))
        except (OSError, ValueError, KeyError, TypeError, SafetensorError):
            return None
        d = mean.shape[0]
        if mean.ndim != 1 or precision.shape != (d, d) or not threshold > 0:
            return None
        if model_id is not None and info.get("model_id") not in (None, model_id):
            return None
        return cls(mean=mean, precision=precision, threshold=threshold, info=info)


def fit_latent_statistics(fit_latents: np.ndarray, calibration_latents: np.ndarray, quantile: float = 0.99,
                          info: dict | None = None) -> LatentStatistics:
    """Mean and Ledoit-Wolf shrunk precision of `fit_latents` (N, D), and the threshold: the `quantile` of the
    distances of `calibration_latents` (M, D), held-out studies that were not in the fit."""
    from sklearn.covariance import LedoitWolf

    if not 0.5 <= quantile < 1.0:
        raise ValueError(f"quantile must be in [0.5, 1), not {quantile}")
    estimator = LedoitWolf(store_precision=True, assume_centered=False).fit(np.asarray(fit_latents, np.float64))
    stats = LatentStatistics(mean=estimator.location_.astype(np.float32),
                             precision=estimator.precision_.astype(np.float32), threshold=1.0, info={})
    calibration = stats.distances(calibration_latents)
    threshold = float(np.quantile(calibration, quantile))
    info = {"estimator": "sklearn.covariance.LedoitWolf", "shrinkage": float(estimator.shrinkage_),
            "quantile": quantile, "n_fit": int(len(fit_latents)), "n_calibrate": int(len(calibration_latents)),
            "latent_dim": int(estimator.location_.shape[0]),
            "calibration_flag_rate": float(np.mean(calibration > threshold)), **(info or {})}
    return LatentStatistics(mean=stats.mean, precision=stats.precision, threshold=threshold, info=info)
