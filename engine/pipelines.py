"""Pipelines: trained models composed with their preprocessing and the study library (the diffusers way).

`CTClipPipeline` is the trunk every flow uses:
    CT (Volume, HU, (z, y, x), LPS) -> preset preprocessing (engine/transforms) -> CT-ViT -> unit image latent
    report text -> tokenizer -> text tower -> unit text latent
    zero-shot: softmax over the prompt pair ("{label} is present." / "{label} is not present.") per label, with the 36
        prompt latents computed once per pipeline (the reference re-encodes them, and the volume, for every label)
    heat map: the image latent head is linear and the depth pooling a mean, so the image-text score splits exactly over
        the (t, h, w) CT-ViT tokens; the token map is resampled onto the caller's volume grid
    retrieval: cosine between a text (or any) latent and the library's image latents (demo studies shipped in assets/,
        plus the user's own indexed CTs in a SQLite EmbeddingIndex)
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from engine.errors import UserError
from engine.labels import LABELS
from engine.volume import Volume

ASSETS = Path(__file__).resolve().parents[1] / "assets"
# The shipped demo checkpoint and the demo library's latents made with it ($CT_CTCLIP_DIR / $CT_LIBRARY_EMBEDDINGS
# point elsewhere, e.g. at a checkpoint being trained).
DEMO_CTCLIP_DIR = Path(os.environ.get("CT_CTCLIP_DIR", ASSETS / "ctclip"))
DEMO_LIBRARY_EMBEDDINGS = Path(os.environ.get("CT_LIBRARY_EMBEDDINGS",
                                              ASSETS / "library" / "ctclip_embeddings.safetensors"))
DEFAULT_USER_LIBRARY = Path(os.environ.get("CT_WORKSTATION_LIBRARY",
                                           Path.home() / ".local" / "share" / "ct-workstation"))
MAX_QUERY_CHARS = 20_000  # a long CT-RATE report is ~8,000 characters; 100 kB of text is not a report


def zero_shot_prompts(label: str) -> tuple[str, str]:
    """CT-CLIP's prompt pair for one label."""
    return f"{label} is present.", f"{label} is not present."


def check_query_text(text: str) -> str:
    """A query must be English report text of sensible length: one clear sentence otherwise.

    The one rule for "English" (the models read English reports only): at least 80 % of the letters are ASCII
    letters, and a query of 4 or more words has at least a third of its words among common English function words
    and radiology terms (engine.labels.english_word_share). So Chinese or Russian fail the first test, German or
    French reports the second, and English with a few accented names ("Löfgren syndrome") passes both."""
    from engine.labels import english_word_share

    if text is None or not str(text).strip():
        raise UserError("The query is empty: type or paste a report, or a few words such as 'right pleural effusion'.")
    text = " ".join(str(text).split())
    if any("\ud800" <= c <= "\udfff" for c in text):  # undecodable bytes (argv's surrogate escapes)
        raise UserError("The query holds bytes that are not valid UTF-8 text; paste it again as plain text.")
    if len(text) > MAX_QUERY_CHARS:
        raise UserError(f"The query is {len(text):,} characters long; a report is at most {MAX_QUERY_CHARS:,}.")
    letters = [c for c in text if c.isalpha()]
    if not letters:
        raise UserError("The query has no words: type or paste report text.")
    latin = sum(c.isascii() for c in letters) / len(letters)
    n_words, english = english_word_share(text)
    if latin < 0.8 or (n_words >= 4 and english < 1 / 3):
        raise UserError("The query does not look like English (at least 80 % of its letters must be a-z and, from 4 "
                        "words on, a third of its words common English or radiology words); the models read "
                        "English radiology reports only.")
    return text


@dataclass
class SearchResult:
    id: str
    score: float
    labels: dict | None
    report: str | None
    source: str  # "phantom" | "file"
    path: str | None = None

    def to_json(self) -> dict:
        return {"id": self.id, "score": round(float(self.score), 6), "labels": self.labels, "report": self.report,
                "source": self.source, "path": self.path}


class CTClipPipeline:
    """The CT CLIP trunk with its preprocessing. Thread-compatible for inference (no state changes after loading)."""

    def __init__(self, model, preprocessing, model_id: str, directory: Path | None = None):
        self.model = model.eval()
        self.preprocessing = preprocessing
        self.model_id = model_id
        self.directory = directory  # the checkpoint folder (its metrics.json gives the zero-shot thresholds)

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, directory: str | Path | None = None, preset: str = "demo") -> "CTClipPipeline":
        """demo: a directory written by CTCLIP.save_pretrained (default assets/ctclip). paper: a directory holding
        the official CT-CLIP_v2.pt (converted once to safetensors next to it) or a converted directory."""
        from engine.ctclip import CTCLIP
        from engine.transforms import Preprocessing

        if preset == "demo":
            directory = Path(directory) if directory else DEMO_CTCLIP_DIR
            if not (directory / "config.json").is_file():
                raise UserError(f"No CT CLIP checkpoint in '{directory}': train one with "
                                "'python -m training ctclip --preset demo'.")
            model = CTCLIP.from_pretrained(directory)
            pre = Preprocessing.demo()
        elif preset == "paper":
            if directory is None:
                raise UserError("The paper preset needs --weights DIR (a folder with CT-CLIP_v2.pt).")
            from engine.weights import load_ctclip_directory

            model = load_ctclip_directory(Path(directory))
            pre = Preprocessing.ctclip()
        else:
            raise UserError(f"Unknown preset {preset!r}: use 'demo' or 'paper'.")
        return cls(model, pre, _model_id(Path(directory)), Path(directory))

    # ----------------------------------------------------------------------------------------------- encoding
    def preprocess(self, volume: Volume) -> tuple[Volume, torch.Tensor]:
        """HU volume -> (the preprocessed volume with its geometry, model tensor (1, 1, z, y, x))."""
        prepared = self.preprocessing.transforms()(volume)
        tensor = torch.from_numpy(np.ascontiguousarray(prepared.array, dtype=np.float32))[None, None]
        return prepared, tensor

    def volume_tokens(self, volume: Volume) -> tuple[Volume, torch.Tensor]:
        """(preprocessed volume, CT-ViT tokens (1, t, h, w, d) before depth pooling)."""
        prepared, tensor = self.preprocess(volume)
        with torch.inference_mode():
            tokens = self.model.visual_transformer(tensor)
        return prepared, tokens

    def embed_volume(self, volume: Volume) -> np.ndarray:
        """Unit-norm image latent (D,) float32."""
        _, tokens = self.volume_tokens(volume)
        with torch.inference_mode():
            latent = self.model.image_latent_from_tokens(tokens.mean(dim=1))
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
        prompts = [p for label in LABELS for p in zero_shot_prompts(label)]
        return self.embed_texts(prompts, batch_size=36).reshape(len(LABELS), 2, -1)

    def zero_shot_from_latent(self, image_latent: np.ndarray) -> dict[str, float]:
        """P(present) per label: softmax over the prompt pair of exp(temperature) * cosine (CT-CLIP's rule)."""
        scale = float(self.model.logit_scale.detach())
        logits = scale * np.einsum("lpd,d->lp", self.prompt_latents, image_latent)
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        return {label: float(p) for label, p in zip(LABELS, probs[:, 0])}

    @cached_property
    def zero_shot_thresholds(self) -> dict[str, float]:
        """Per-label decision thresholds on P(present), chosen on the held-out test split by CT-CLIP's rule (the
        ROC point closest to the top-left corner), from the checkpoint's metrics.json; {} when it has none.
        P(present) is a softmax over two prompts, so 0.5 is not the line between present and absent."""
        path = self.directory / "metrics.json" if self.directory else None
        if path is None or not path.is_file():
            return {}
        try:
            per_label = json.loads(path.read_text())["zero_shot"]["per_label"]
            return {label: float(per_label[label]["threshold"]) for label in LABELS
                    if per_label.get(label, {}).get("threshold") is not None}
        except (ValueError, KeyError, TypeError):
            return {}

    def zero_shot(self, volume: Volume) -> dict[str, float]:
        return self.zero_shot_from_latent(self.embed_volume(volume))

    # ---------------------------------------------------------------------------------------------- heat map
    def heatmap(self, volume: Volume, text: str) -> tuple[np.ndarray, float]:
        """Where `text` matches `volume`: (map on the volume's own (z, y, x) grid, cosine score).

        Each CT-ViT token (t, h, w) contributes exactly <W_hw x_thw, q> / (T |v|) to the cosine score (linear head,
        mean pooling), so the token map sums to the score. The map is scaled to [0, 1] over its positive part (the
        tokens that raise the score) and resampled linearly from the token grid onto the caller's grid."""
        import SimpleITK as sitk

        query = torch.from_numpy(self.embed_query(text))
        prepared, tokens = self.volume_tokens(volume)
        b, t, h, w, d = tokens.shape
        with torch.inference_mode():
            weight = self.model.to_visual_latent.weight.float().view(-1, h, w, d)  # (latent, h, w, d)
            back = torch.einsum("l,lhwd->hwd", query, weight)
            pooled = tokens.mean(dim=1)
            norm = self.model.to_visual_latent(pooled.flatten(1)).norm()
            shares = (tokens[0] * back[None]).sum(-1) / (t * norm)  # (t, h, w)
        score = float(shares.sum())
        token_map = shares.numpy().astype(np.float32)
        positive = np.clip(token_map, 0, None)
        token_map = positive / positive.max() if positive.max() > 0 else positive
        # Token (k, j, i) covers voxels [k*pt, (k+1)*pt) of the preprocessed grid: place its value at the centre.
        pt = self.model.config.temporal_patch_size
        ps = self.model.config.patch_size
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
        return sitk.GetArrayFromImage(resampled), score


def _model_id(directory: Path) -> str:
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


# ---------------------------------------------------------------------------------------------------- library

class StudyLibrary:
    """Everything a search can return: the demo studies (embeddings shipped in assets/) and the user's indexed CTs.

    Both are ranked together by exact cosine; the user's library is a SQLite EmbeddingIndex in `user_dir`
    (default ~/.local/share/ct-workstation, or $CT_WORKSTATION_LIBRARY), keyed by the pipeline's model id."""

    def __init__(self, pipeline: CTClipPipeline, user_dir: str | Path | None = None,
                 demo_embeddings: Path = DEMO_LIBRARY_EMBEDDINGS):
        from engine.index import EmbeddingIndex
        from engine.library import DemoLibrary

        self.pipeline = pipeline
        self.demo = DemoLibrary.load()
        self.demo_ids, self.demo_matrix = _load_demo_embeddings(demo_embeddings, pipeline.model_id, self.demo)
        self.user_dir = Path(user_dir) if user_dir else DEFAULT_USER_LIBRARY
        self._index_cls = EmbeddingIndex
        self._user_index = None

    @property
    def user_index(self):
        """The user's SQLite library (opened on first use; created on first add)."""
        if self._user_index is None:
            path = self.user_dir / "library.sqlite"
            if not path.exists():
                try:
                    self.user_dir.mkdir(parents=True, exist_ok=True)
                except OSError as err:
                    raise UserError(f"Cannot create the library folder '{self.user_dir}': {err.strerror}.") from None
            self._user_index = self._index_cls(path, model_id=self.pipeline.model_id)
        return self._user_index

    def __len__(self) -> int:
        return len(self.demo_ids) + (len(self.user_index) if self._has_user_index() else 0)

    def _has_user_index(self) -> bool:
        return self._user_index is not None or (self.user_dir / "library.sqlite").exists()

    def search(self, latent: np.ndarray, k: int = 10) -> list[SearchResult]:
        """Top-k studies by cosine over the demo library and the user's library together."""
        if k < 1:
            raise UserError("k must be at least 1.")
        latent = np.asarray(latent, dtype=np.float32)
        latent = latent / max(float(np.linalg.norm(latent)), 1e-12)
        candidates: list[tuple[float, str, str]] = []
        if len(self.demo_ids):
            scores = self.demo_matrix @ latent
            top = np.argsort(-scores, kind="stable")[:k]
            candidates += [(float(scores[i]), "phantom", self.demo_ids[i]) for i in top]
        if self._has_user_index() and len(self.user_index):
            candidates += [(s, "file", i) for i, s in self.user_index.search(latent, k)]
        candidates.sort(key=lambda c: -c[0])
        return [self._result(score, source, sid) for score, source, sid in candidates[:k]]

    def _result(self, score: float, source: str, sid: str) -> SearchResult:
        if source == "phantom":
            study = self.demo.get(sid)
            return SearchResult(sid, score, study.label_dict, study.report_text, "phantom")
        row = self.user_index.get(sid)
        return SearchResult(sid, score, row.labels, row.report, row.source, row.path)

    def volume(self, result_id: str) -> Volume:
        """The volume of a search result: rendered (demo) or read from its file (user library)."""
        from engine.volume import read_ct

        if result_id in self.demo:
            return self.demo.volume(result_id)
        row = self.user_index.get(result_id)
        if row is None:
            raise UserError(f"No study {result_id!r} in the library.")
        return read_ct(row.path)

    def index_file(self, path: str | Path) -> tuple[str, bool]:
        """Add one CT file / DICOM folder / zip to the user's library. Returns (id, newly_added). Idempotent."""
        from engine.index import file_sha256
        from engine.volume import read_ct

        path = Path(path).resolve()
        if not path.exists():
            raise UserError(f"'{path}' does not exist.")
        sha = file_sha256(path)
        existing = self.user_index.find_sha256(sha)
        if existing is not None:
            return existing, False
        volume = read_ct(path)
        latent = self.pipeline.embed_volume(volume)
        name = path.name.split(".")[0] or "ct"
        sid = f"{name}-{sha[:8]}"
        meta = {"shape": list(volume.shape_xyz), "spacing": [round(s, 4) for s in volume.spacing],
                "warnings": volume.warnings}
        self.user_index.add(sid, latent, sha256=sha, source="file", path=str(path), meta=meta)
        return sid, True


def _load_demo_embeddings(path: Path, model_id: str, demo) -> tuple[list[str], np.ndarray]:
    """Shipped demo-library latents for this checkpoint; an empty set if they were made by another checkpoint."""
    from safetensors.numpy import load_file
    from safetensors import safe_open

    if not path.is_file():
        return [], np.zeros((0, 1), np.float32)
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata() or {}
    if meta.get("model_id") != model_id:
        return [], np.zeros((0, 1), np.float32)
    arrays = load_file(str(path))
    ids = json.loads(meta["ids"])
    matrix = arrays["embeddings"].astype(np.float32)
    matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    return ids, matrix


def build_demo_embeddings(pipeline: CTClipPipeline, out: Path = DEMO_LIBRARY_EMBEDDINGS, progress=None,
                          ids: list[str] | None = None) -> Path:
    """Render and encode the demo studies (all, or `ids`); write (ids, embeddings, model_id) to a safetensors file.
    `progress` wraps the iteration (e.g. tqdm)."""
    from safetensors.numpy import save_file

    from engine.library import DemoLibrary

    demo = DemoLibrary.load(cache_size=1)
    studies = [demo.get(i) for i in ids] if ids is not None else list(demo.studies)
    iterator = studies if progress is None else progress(studies)
    latents = [pipeline.embed_volume(demo.volume(study.id)) for study in iterator]
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": np.stack(latents).astype(np.float16)}, str(out),
              metadata={"model_id": pipeline.model_id, "ids": json.dumps([s.id for s in studies]),
                        "made": time.strftime("%Y-%m-%d")})
    return out


def models_info() -> dict:
    """What `engine info` reports about the trained models that are installed."""
    info = {"models": {}}
    if (DEMO_CTCLIP_DIR / "config.json").is_file():
        config = json.loads((DEMO_CTCLIP_DIR / "config.json").read_text())
        entry = {"path": str(DEMO_CTCLIP_DIR), "preset": config.get("preset"),
                 "model_id": _model_id(DEMO_CTCLIP_DIR)}
        metrics = DEMO_CTCLIP_DIR / "metrics.json"
        if metrics.is_file():
            entry["metrics"] = json.loads(metrics.read_text())
        info["models"]["ctclip"] = entry
    return info
