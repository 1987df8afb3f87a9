"""The CT CLIP pipeline: the trunk every flow uses (models composed with their preprocessing, the diffusers way).

    CT (Volume, HU, (z, y, x), LPS) -> the checkpoint folder's preprocessing (engine.transforms.prepare)
        -> CT-ViT -> unit image latent
    report text -> tokenizer -> text tower -> unit text latent
    zero-shot: CT-CLIP's rule (engine.models.ctclip.zero_shot_probabilities), with the 36 prompt latents computed
        once per pipeline (the reference re-encodes them, and the volume, for every label)
    heat map: CTCLIP.token_scores on the unpooled (t, h, w) CT-ViT tokens (exact shares of the score), resampled
        onto the caller's volume grid
    out-of-distribution check: Mahalanobis distance of the image latent to the training latents, from the
        checkpoint folder's latent statistics (engine/ood.py); unknown when the folder has none
Calls that take time follow engine/pipelines/base.py (progress, cancel; the CT CLIP is deterministic: no seed).
Retrieval over the studies lives in engine/study_library.py.
"""
from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from engine.errors import UserError
from engine.labels import LABELS
from engine.pipelines.base import CancelSignal, ProgressCallback, RunControl, held_out_zero_shot
from engine.query import check_query_text
from engine.transforms import Preprocessing, prepare
from engine.volume import Volume


class CTClipPipeline:
    """The CT CLIP trunk with its preprocessing. Thread-compatible for inference (no state changes after loading)."""

    def __init__(self, model, preprocessing: Preprocessing | None = None, model_id: str = "ctclip",
                 directory: Path | None = None):
        self.model = model.eval()
        self.preprocessing = preprocessing or model.preprocessing  # default: what the checkpoint folder says
        self.model_id = model_id
        self.directory = directory  # the checkpoint folder (its metrics.json gives the zero-shot thresholds)

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, directory: str | Path | None = None, preset: str = "demo") -> "CTClipPipeline":
        """demo: a folder written by CTCLIP.save_pretrained (default settings.ctclip_dir()). paper: a folder holding
        the official CT-CLIP_v2.pt (converted once to safetensors next to it) or a converted folder. The
        preprocessing is the folder's own (preprocessing.json, else its config's default)."""
        from engine.models.ctclip import CTCLIP
        from engine.settings import ctclip_dir

        if preset == "demo":
            directory = Path(directory) if directory else ctclip_dir()
            if not (directory / "config.json").is_file():
                raise UserError(f"No CT CLIP checkpoint in '{directory}': train one with "
                                "'python -m training ctclip --preset demo'.")
            model = CTCLIP.from_pretrained(directory)
        elif preset == "paper":
            if directory is None:
                raise UserError("The paper preset needs --weights DIR (a folder with CT-CLIP_v2.pt).")
            from engine.convert.ctclip import load_ctclip_directory

            model = load_ctclip_directory(Path(directory))
        else:
            raise UserError(f"Unknown preset {preset!r}: use 'demo' or 'paper'.")
        return cls(model, None, model_id(Path(directory)), Path(directory))

    # ----------------------------------------------------------------------------------------------- encoding
    def preprocess(self, volume: Volume) -> tuple[Volume, torch.Tensor]:
        """HU volume -> (the preprocessed volume with its geometry, model tensor (1, 1, z, y, x))."""
        prepared, tensor = prepare(volume, self.preprocessing)
        return prepared, tensor[None]

    def volume_tokens(self, volume: Volume) -> tuple[Volume, torch.Tensor]:
        """(preprocessed volume, CT-ViT tokens (1, t, h, w, d) before depth pooling)."""
        prepared, tensor = self.preprocess(volume)
        with torch.inference_mode():
            tokens = self.model.visual_transformer(tensor)
        return prepared, tokens

    def embed_volume(self, volume: Volume, *, progress: ProgressCallback | None = None,
                     cancel: CancelSignal | None = None) -> np.ndarray:
        """Unit-norm image latent (D,) float32."""
        control = RunControl(progress, cancel)
        control.step(0.0, "preparing the CT")
        prepared, tensor = self.preprocess(volume)
        control.step(0.3, "encoding the CT")
        with torch.inference_mode():
            latent = self.model.encode_image(tensor)
        control.step(1.0, "encoded")
        return latent[0].float().numpy()

    def embed_texts(self, texts: list[str], batch_size: int = 16) -> np.ndarray:
        """Unit-norm text latents (N, D) float32."""
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                enc = self.model.tokenize(list(texts[i:i + batch_size]))
                out.append(self.model.encode_text(enc["input_ids"], enc["attention_mask"]).float())
        return torch.cat(out).numpy()

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed_texts([check_query_text(text)])[0]

    # ---------------------------------------------------------------------------------------------- zero-shot
    @cached_property
    def prompt_latents(self) -> np.ndarray:
        """(18, 2, D): latents of the (present, not present) prompts, computed once per pipeline."""
        from engine.models.ctclip import all_zero_shot_prompts

        return self.embed_texts(all_zero_shot_prompts(), batch_size=36).reshape(len(LABELS), 2, -1)

    def zero_shot_from_latent(self, image_latent: np.ndarray) -> dict[str, float]:
        """P(present) per label: softmax over the prompt pair of exp(temperature) * cosine (CT-CLIP's rule)."""
        from engine.models.ctclip import zero_shot_probabilities

        scale = float(self.model.logit_scale.detach())
        probs = zero_shot_probabilities(torch.from_numpy(np.asarray(image_latent, np.float32))[None],
                                        torch.from_numpy(self.prompt_latents), scale)[0]
        return {label: float(p) for label, p in zip(LABELS, probs)}

    @cached_property
    def text_reader(self):
        """The checkpoint's prompt-feature reader (engine.text_reading.TextReader: speech latents, and text when the
        folder has no latent reader), or None when its folder has none (or one fitted for other weights or prompts)."""
        from engine.models.ctclip import all_zero_shot_prompts
        from engine.text_reading import TextReader

        return TextReader.load(self.directory, self.model_id, all_zero_shot_prompts())

    @cached_property
    def latent_reader(self):
        """The checkpoint's reader of typed and written text (engine.text_reading.LatentReader), or None."""
        from engine.text_reading import LatentReader

        return LatentReader.load(self.directory, self.model_id, int(self.prompt_latents.shape[-1]))

    def text_reading_from_latent(self, latent: np.ndarray, source: str = "text") -> dict[str, float]:
        """P(stated) per label of a latent: source "text", a typed or written report's own text latent (the latent
        reader; the prompt-feature reader when the folder has no latent reader); "speech", a speech latent distilled
        from one (the prompt-feature reader, with which the speech figures were measured: on spoken text neither
        reader was clearly better, engine/text_reading.py).
        Without a prompt-feature reader, the uncalibrated image rule (check `text_reader is None` before presenting it
        as what the text states)."""
        from engine.text_reading import prompt_features

        if source not in ("text", "speech"):
            raise ValueError(f"source must be 'text' or 'speech', not {source!r}")
        reader = self.text_reader
        if reader is None:
            return self.zero_shot_from_latent(latent)
        if source == "text" and self.latent_reader is not None:
            probabilities = self.latent_reader.probabilities(latent)[0]
        else:
            features = prompt_features(latent, self.prompt_latents, float(self.model.logit_scale.detach()))
            probabilities = reader.probabilities(features)[0]
        return {label: float(p) for label, p in zip(LABELS, probabilities)}

    @cached_property
    def zero_shot_thresholds(self) -> dict[str, float]:
        """Per-label decision thresholds on P(present), chosen on the held-out test split by CT-CLIP's rule (the
        ROC point closest to the top-left corner), from the checkpoint's metrics.json; {} when it has none.
        P(present) is a softmax over two prompts, so 0.5 is not the line between present and absent."""
        return held_out_zero_shot(self.directory, "threshold")

    @cached_property
    def zero_shot_auroc(self) -> dict[str, float]:
        """Per-label zero-shot AUROC on the held-out test split (how far each label's bar can be trusted: 0.5 is
        chance, 1 a perfect ranking), from the checkpoint's metrics.json; {} when it has none."""
        return held_out_zero_shot(self.directory, "auroc")

    @cached_property
    def latent_statistics(self):
        """The checkpoint's training-latent statistics (engine.ood.LatentStatistics), or None when its folder has
        none (or has statistics of other weights): every distribution check then answers unknown."""
        from engine.ood import LatentStatistics

        return LatentStatistics.load(self.directory, self.model_id)

    def distribution_check(self, image_latent: np.ndarray):
        """Is the scan whose image latent this is like the training phantoms? engine.ood.DistributionCheck
        (in_distribution True/False, ood_score = distance / calibrated threshold), or engine.ood.UNKNOWN."""
        from engine.ood import UNKNOWN

        stats = self.latent_statistics
        return UNKNOWN if stats is None else stats.check(image_latent)

    def zero_shot(self, volume: Volume, *, progress: ProgressCallback | None = None,
                  cancel: CancelSignal | None = None) -> dict[str, float]:
        """P(present) of each of the 18 labels for an HU volume."""
        latent = self.embed_volume(volume, progress=progress, cancel=cancel)
        return self.zero_shot_from_latent(latent)

    def zero_shot_checked(self, volume: Volume, *, progress: ProgressCallback | None = None,
                          cancel: CancelSignal | None = None):
        """(P(present) per label, engine.ood.DistributionCheck) from one encoding of the volume: the reading and
        whether it can be trusted (a flagged scan's bars are not findings)."""
        latent = self.embed_volume(volume, progress=progress, cancel=cancel)
        return self.zero_shot_from_latent(latent), self.distribution_check(latent)

    # ---------------------------------------------------------------------------------------------- heat map
    def heatmap(self, volume: Volume, text: str, *, progress: ProgressCallback | None = None,
                cancel: CancelSignal | None = None) -> tuple[np.ndarray, float]:
        """Where `text` matches `volume`: (map on the volume's own (z, y, x) grid, cosine score).

        Each CT-ViT token's exact share of the cosine score comes from CTCLIP.token_scores (the shares sum to the
        score). The map is scaled to [0, 1] over its positive part (the tokens that raise the score) and resampled
        linearly from the token grid onto the caller's grid."""
        control = RunControl(progress, cancel)
        control.step(0.0, "encoding the query")
        query = torch.from_numpy(self.embed_query(text))
        control.step(0.1, "encoding the CT")
        prepared, tokens = self.volume_tokens(volume)
        control.step(0.8, "placing the map on the CT")
        with torch.inference_mode():
            shares = self.model.token_scores(tokens.float(), query)[0]  # (t, h, w)
        score = float(shares.sum())
        token_map = shares.numpy().astype(np.float32)
        positive = np.clip(token_map, 0, None)
        token_map = positive / positive.max() if positive.max() > 0 else positive
        heat = _token_map_on_volume(token_map, prepared, volume, self.model.config.vision)
        control.step(1.0, "done")
        return heat, score


def _token_map_on_volume(token_map: np.ndarray, prepared: Volume, volume: Volume, vision) -> np.ndarray:
    """A (t, h, w) token map placed on the preprocessed grid (token (k, j, i) covers voxels [k*pt, (k+1)*pt) ...:
    its value sits at their centre) and resampled linearly onto `volume`'s own grid."""
    import SimpleITK as sitk

    pt, ps = vision.temporal_patch_size, vision.patch_size
    sx, sy, sz = prepared.spacing
    image = sitk.GetImageFromArray(token_map)
    image.SetSpacing((sx * ps, sy * ps, sz * pt))
    direction = np.array(prepared.direction).reshape(3, 3)
    offset = direction @ np.array([(ps - 1) / 2 * sx, (ps - 1) / 2 * sy, (pt - 1) / 2 * sz])
    image.SetOrigin(tuple(np.array(prepared.origin) + offset))
    image.SetDirection(prepared.direction)
    reference = sitk.Image(*volume.shape_xyz, sitk.sitkFloat32)
    reference.SetSpacing(volume.spacing)
    reference.SetOrigin(volume.origin)
    reference.SetDirection(volume.direction)
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)


def model_id(directory: Path) -> str:
    """A stable id of a checkpoint: hash of its config and weights file sizes + head bytes (cheap, content-based)."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "CT-CLIP_v2.pt"):
        p = directory / name
        if p.is_file():
            h.update(name.encode())
            h.update(str(p.stat().st_size).encode())
            with open(p, "rb") as f:
                h.update(f.read(1 << 20))
    return f"ctclip-{h.hexdigest()[:16]}"
