"""The chest-radiograph pipeline (X2CT-CLIP): a radiograph -> the 18 CT-level findings, the most similar CT studies
and where on the film a finding's score comes from.

    Radiograph (engine.radiograph: [0, 1], brighter = more attenuation) -> engine.radiograph_view.check_frontal_chest
        (a CT slice or a lateral view is refused with one sentence) -> CXREncoder.prepare -> CXR encoder
        -> unit latent in the CT CLIP's space
    findings: the CT CLIP's zero-shot rule on that latent (CTClipPipeline.zero_shot_from_latent: the same prompt
        latents and temperature as a CT's reading)
    similar studies: engine.study_library.StudyLibrary.search with the latent (demo library + the user's CTs)
    location map: CXREncoder.location_scores with q = latent("present") - latent("not present") of the finding, so
        each feature-map location's exact share of the present-vs-absent cosine difference (`location_shares`; they
        sum to it, and P(present) = sigmoid(logit scale x that sum)), placed back on the radiograph's own pixels
        (`location_map`).
Deterministic (no seed); progress and cancel as engine/pipelines/base.py.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.errors import UserError
from engine.labels import LABELS
from engine.pipelines.base import CancelSignal, ProgressCallback, RunControl, held_out_zero_shot
from engine.radiograph import Radiograph

TRAIN_HINT = "train one with 'python -m training x2ct --preset demo' and copy runs/x2ct-demo/model to assets/x2ct"


class CXRPipeline:
    """The CXR encoder on top of the CT CLIP trunk (whose prompt latents and library it shares)."""

    def __init__(self, encoder, ctclip, directory: Path | None = None):
        self.encoder = encoder.eval()
        self.ctclip = ctclip
        self.directory = directory
        latent = encoder.config.latent_dim
        if latent != ctclip.model.config.latent_dim:
            raise UserError(f"The chest X-ray model's latent ({latent}) is not the CT CLIP's "
                            f"({ctclip.model.config.latent_dim}): {TRAIN_HINT}.")

    @classmethod
    def from_pretrained(cls, directory: str | Path | None = None, ctclip=None) -> "CXRPipeline":
        """Load the encoder folder (default settings.x2ct_dir()) over a CT CLIP pipeline (default the shipped one)."""
        from engine.models.cxr_encoder import CXREncoder
        from engine.pipelines.ctclip import CTClipPipeline

        directory = cxr_model_dir(directory)
        encoder = CXREncoder.from_pretrained(directory)
        return cls(encoder, ctclip or CTClipPipeline.from_pretrained(), directory)

    @cached_property
    def zero_shot_auroc(self) -> dict[str, float]:
        """Per-label AUROC of the findings read from radiographs on the held-out test split (DRRs of unseen phantoms;
        training/eval_x2ct.py), from the encoder folder's metrics.json; {} when it has none."""
        return held_out_zero_shot(self.directory, "auroc")

    def prepare(self, radiograph: Radiograph) -> torch.Tensor:
        """(1, 1, S, S) encoder input."""
        return self.encoder.prepare(radiograph)[None]

    def embed_radiograph(self, radiograph: Radiograph, *, progress: ProgressCallback | None = None,
                         cancel: CancelSignal | None = None) -> np.ndarray:
        """Unit latent (D,) float32 in the CT CLIP's space."""
        from engine.radiograph_view import check_frontal_chest

        control = RunControl(progress, cancel)
        control.step(0.0, "checking the radiograph")
        check_frontal_chest(radiograph)
        tensor = self.prepare(radiograph)
        control.step(0.3, "encoding the radiograph")
        with torch.inference_mode():
            latent = self.encoder.encode_image(tensor)[0]
        control.step(1.0, "encoded")
        return latent.float().numpy()

    def findings(self, radiograph: Radiograph, *, progress: ProgressCallback | None = None,
                 cancel: CancelSignal | None = None) -> dict[str, float]:
        """P(present) of each of the 18 CT-RATE labels, read from the radiograph through the CT CLIP's prompts."""
        return self.ctclip.zero_shot_from_latent(self.embed_radiograph(radiograph, progress=progress, cancel=cancel))

    def location_shares(self, radiograph: Radiograph, label: str) -> np.ndarray:
        """The class activation map of `label`, exact: float32 (h, w) over the encoder's feature map, each location's
        share of cos(latent, "present" prompt) - cos(latent, "not present" prompt). The shares sum to that
        difference, so P(present) of `findings` = sigmoid(logit scale x shares.sum())."""
        if label not in LABELS:
            raise UserError(f"Unknown finding {label!r}: use one of the 18 CT-RATE labels.")
        prompts = torch.from_numpy(self.ctclip.prompt_latents[LABELS.index(label)])      # (present, not present)
        with torch.inference_mode():
            shares = self.encoder.location_scores(self.prepare(radiograph), prompts[0] - prompts[1])[0]
        return shares.float().numpy()

    def location_map(self, radiograph: Radiograph, label: str) -> tuple[np.ndarray, float]:
        """Where on the film the finding `label` is read: (map float32 (H, W) on the radiograph's own pixels, its
        positive part scaled to [0, 1], and the present-minus-absent cosine difference the shares split exactly)."""
        shares = self.location_shares(radiograph, label)
        return _on_radiograph(shares, radiograph.image.shape, self.encoder.config.image_size), float(shares.sum())


def cxr_model_dir(directory: str | Path | None = None) -> Path:
    """The encoder folder (default settings.x2ct_dir()); one sentence saying how to train it when it is missing
    (checked before anything loads)."""
    from engine.settings import x2ct_dir

    directory = Path(directory) if directory else x2ct_dir()
    if not (directory / "config.json").is_file():
        raise UserError(f"No chest X-ray model in '{directory}': {TRAIN_HINT}.")
    return directory


def _on_radiograph(shares: np.ndarray, shape: tuple[int, int], size: int) -> np.ndarray:
    """A (h, w) location map over the square S x S input -> the radiograph's (H, W) pixels: undo the centred,
    aspect-keeping resize and padding of engine.radiograph.normalise_for_model; positive part scaled to [0, 1]."""
    positive = np.clip(shares, 0, None)
    positive = positive / positive.max() if positive.max() > 0 else positive
    square = F.interpolate(torch.from_numpy(positive.astype(np.float32))[None, None], size=(size, size),
                           mode="bilinear", align_corners=False)[0, 0]
    h, w = shape
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    top, left = (size - new_h) // 2, (size - new_w) // 2
    inside = square[top:top + new_h, left:left + new_w]
    return F.interpolate(inside[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
