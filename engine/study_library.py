"""The study library a search ranks: the demo studies (their CT CLIP latents shipped in assets/) and the user's own
indexed CTs (a SQLite EmbeddingIndex), ranked together by exact cosine to a query latent."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import UserError
from engine.pipelines.ctclip import CTClipPipeline
from engine.settings import library_embeddings, user_library_dir
from engine.volume import Volume


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


class StudyLibrary:
    """Everything a search can return: the demo studies (embeddings shipped in assets/) and the user's indexed CTs.

    Both are ranked together by exact cosine; the user's library is a SQLite EmbeddingIndex in `user_dir`
    (default ~/.local/share/ct-workstation, or $CT_WORKSTATION_LIBRARY), keyed by the pipeline's model id."""

    def __init__(self, pipeline: CTClipPipeline, user_dir: str | Path | None = None,
                 demo_embeddings: Path | None = None):
        from engine.index import EmbeddingIndex
        from engine.library import DemoLibrary

        self.pipeline = pipeline
        self.demo = DemoLibrary.load()
        self.demo_ids, self.demo_matrix = _load_demo_embeddings(demo_embeddings or library_embeddings(),
                                                                pipeline.model_id, self.demo)
        self.user_dir = user_library_folder(user_dir)
        self._index_cls = EmbeddingIndex
        self._user_index = None

    @property
    def user_index(self):
        """The user's SQLite library (opened on first use; created on first add)."""
        if self._user_index is None:
            path = self.user_dir / "library.sqlite"   # EmbeddingIndex creates it (and its folder) user-only
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
        return read_ct(Path(row.path).expanduser())

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
        sid = f"ct-{sha[:12]}"   # from the content: a file or folder named after a patient never becomes an id
        meta = {"shape": list(volume.shape_xyz), "spacing": [round(s, 4) for s in volume.spacing],
                "warnings": volume.warnings}
        self.user_index.add(sid, latent, sha256=sha, source="file", path=stored_path(path), meta=meta)
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


def build_demo_embeddings(pipeline: CTClipPipeline, out: Path | None = None, progress=None,
                          ids: list[str] | None = None) -> Path:
    """Render and encode the demo studies (all, or `ids`); write (ids, embeddings, model_id) to a safetensors file
    (default settings.library_embeddings()). `progress` wraps the iteration (e.g. tqdm)."""
    from safetensors.numpy import save_file

    from engine.library import DemoLibrary

    demo = DemoLibrary.load(cache_size=1)
    studies = [demo.get(i) for i in ids] if ids is not None else list(demo.studies)
    iterator = studies if progress is None else progress(studies)
    latents = [pipeline.embed_volume(demo.volume(study.id)) for study in iterator]
    out = Path(out or library_embeddings())
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": np.stack(latents).astype(np.float16)}, str(out),
              metadata={"model_id": pipeline.model_id, "ids": json.dumps([s.id for s in studies]),
                        "made": time.strftime("%Y-%m-%d")})
    return out


def user_library_folder(user_dir: str | Path | None = None) -> Path:
    """The user's library folder (`user_dir`, else $CT_WORKSTATION_LIBRARY or the default); one sentence when it
    names a file. Checked before any model loads."""
    folder = Path(user_dir) if user_dir else user_library_dir()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"The library '{folder}' is a file; --library (or $CT_WORKSTATION_LIBRARY) must name a "
                        "folder.")
    return folder


def stored_path(path: Path) -> str:
    """What the library keeps to find a CT again: its path, with the home folder written as '~' (the user name and
    home layout stay out of the file). The path itself is needed to reopen the study; the library file is user-only
    (0600) and study ids come from the content, never from the name."""
    path = Path(path).resolve()
    try:
        return str(Path("~") / path.relative_to(Path.home().resolve()))
    except ValueError:
        return str(path)
