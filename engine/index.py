"""A persistent library of CT embeddings: one SQLite file (WAL mode) and an exact cosine search over it.

Table `studies` (one row per study and model):
    id             TEXT     the study's id (unique within a model_id)
    model_id       TEXT     the checkpoint that made the embedding: an `EmbeddingIndex` only ever sees the rows of
                            its own model_id, so embeddings of different checkpoints never mix in one ranking
    source         TEXT     'phantom' | 'file'
    path           TEXT     where the study came from (file, DICOM folder or zip), or NULL
    content_sha256 TEXT     hash of the content (`file_sha256`); unique within a model_id: re-adding the same
                            content returns the existing id instead of a duplicate
    labels         TEXT     JSON {label: 0|1} for the 18 CT-RATE labels, or NULL when unknown
    report         TEXT     the report, or NULL
    meta           TEXT     JSON object (spacing, shape, seed, ...)
    embedding      BLOB     float32 little-endian, `dim` values, as given (search normalises)
    dim            INTEGER  embedding length; one per model_id
    added_at       TEXT     UTC ISO 8601
Primary key (model_id, id) and UNIQUE (model_id, content_sha256) -- the id alone is not the key, so the same
library can hold the embeddings of a study under two checkpoints.

Every `add` commits on its own: an indexing run interrupted half-way keeps what it already indexed. `add_many`
commits a batch in one transaction (bulk loads of the demo library).

Search: exact cosine similarity against every row, through a `SearchBackend`. The default `ExactCosine` keeps the
L2-normalised embeddings in one float32 (N, D) matrix in memory (loaded once, rebuilt after an add or when another
process commits) and ranks by one matrix-vector product: 100,000 studies x 512-d is 205 MB and one query a few
tens of ms on a CPU (bench/bench_index.py). The path to millions of studies is another `SearchBackend` with the same
two methods, built from the same rows: FAISS `IndexHNSWFlat` (inner product on normalised vectors; sub-ms queries,
memory ~ N x D x 4 bytes + graph) or `IndexIVFPQ` (e.g. 4096 lists, 64 x 8-bit codes = 64 bytes per study, so
10 M studies in under 1 GB, trained on a sample of the rows), or pgvector's HNSW index in PostgreSQL when the
library is shared by several workstations. Approximate backends should re-rank their top candidates exactly.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import sqlite3
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np

from engine.errors import UserError
from engine.labels import LABELS

SOURCES = ("phantom", "file")
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    id             TEXT    NOT NULL,
    model_id       TEXT    NOT NULL,
    source         TEXT    NOT NULL CHECK (source IN ('phantom', 'file')),
    path           TEXT,
    content_sha256 TEXT    NOT NULL,
    labels         TEXT,
    report         TEXT,
    meta           TEXT    NOT NULL DEFAULT '{}',
    embedding      BLOB    NOT NULL,
    dim            INTEGER NOT NULL,
    added_at       TEXT    NOT NULL,
    PRIMARY KEY (model_id, id),
    UNIQUE (model_id, content_sha256)
);
"""


# ----------------------------------------------------------------------------------------------------------------
# Content hashing
# ----------------------------------------------------------------------------------------------------------------

def _sha256_stream(stream, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: stream.read(chunk), b""):
        digest.update(block)
    return digest.hexdigest()


def _is_hidden(parts: Sequence[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def file_sha256(path) -> str:
    """SHA-256 (hex) of a study's content.

    A file: the hash of its bytes. A DICOM folder or a .zip: the hash of the SORTED per-member content hashes
    (hidden files and __MACOSX skipped), so file names, member order and zipping do not matter -- the same DICOM
    series as a folder or as a zip hashes the same.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist.")
    if path.is_dir():
        members = []
        for member in sorted(path.rglob("*")):
            if member.is_file() and not _is_hidden(member.relative_to(path).parts):
                with open(member, "rb") as f:
                    members.append(_sha256_stream(f))
    elif zipfile.is_zipfile(path) and path.suffix.lower() == ".zip":
        members = []
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.is_dir() and not _is_hidden(Path(info.filename).parts):
                    with archive.open(info) as f:
                        members.append(_sha256_stream(f))
    else:
        with open(path, "rb") as f:
            return _sha256_stream(f)
    if not members:
        raise UserError(f"{path} contains no files.")
    return hashlib.sha256("\n".join(sorted(members)).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Search backends
# ----------------------------------------------------------------------------------------------------------------

class SearchBackend(Protocol):
    """What the index needs from a nearest-neighbour structure: build once from all rows, then answer queries."""

    def build(self, unit_embeddings: np.ndarray) -> None:
        """unit_embeddings: (N, D) float32, rows L2-normalised, in the order of `EmbeddingIndex.ids()`."""

    def search(self, unit_query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """unit_query: (D,) float32 normalised -> (row indices, cosine scores), best first, at most k."""


class ExactCosine:
    """Exact cosine ranking by one float32 matrix-vector product. Ties rank in insertion order."""

    def __init__(self) -> None:
        self.matrix = np.zeros((0, 0), dtype=np.float32)

    def build(self, unit_embeddings: np.ndarray) -> None:
        self.matrix = unit_embeddings

    def search(self, unit_query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = self.matrix @ unit_query
        k = min(k, len(scores))
        if k == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.lexsort((top, -scores[top]))]                 # by score, then by row (stable on ties)
        return top, scores[top]


# ----------------------------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class IndexedStudy:
    """One row of the library."""
    id: str
    model_id: str
    source: str
    path: str | None
    sha256: str
    labels: dict[str, int] | None
    report: str | None
    meta: dict
    embedding: np.ndarray       # (D,) float32, as added
    added_at: str


def _labels_json(labels) -> str | None:
    """Accept {label: 0|1} (any subset of the 18 names; missing ones = 0) or a length-18 0/1 sequence."""
    if labels is None:
        return None
    if isinstance(labels, dict):
        unknown = [k for k in labels if k not in LABELS]
        if unknown:
            raise UserError(f"Unknown label {unknown[0]!r}; the 18 labels are: {', '.join(LABELS)}.")
        values = [labels.get(name, 0) for name in LABELS]
    else:
        values = list(np.asarray(labels).ravel())
        if len(values) != len(LABELS):
            raise UserError(f"A label vector needs {len(LABELS)} values, got {len(values)}.")
    if any(v not in (0, 1) for v in values):
        raise UserError("Label values must be 0 or 1.")
    return json.dumps({name: int(v) for name, v in zip(LABELS, values)})


def _create_private(path: Path) -> None:
    """Create the index file's folder (0700) and the file itself (0600) if they do not exist: the library describes
    the user's patients' CTs, so only the user may read it. SQLite creates its -wal and -shm files with the
    database file's permissions."""
    if not path.parent.exists():
        try:
            path.parent.mkdir(mode=0o700, parents=True)
        except OSError as err:
            raise UserError(f"Cannot create the library folder '{path.parent}': {err.strerror}.") from None
    if not path.exists():
        try:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError as err:
            raise UserError(f"Cannot create the library file '{path}': {err.strerror}.") from None


class EmbeddingIndex:
    """The embeddings of one model (`model_id`) in a SQLite file; exact cosine search over all of them.

    Thread-safe (one connection behind a lock); several processes may share the file (WAL mode).
    """

    def __init__(self, path, model_id: str = "default", backend: SearchBackend | None = None) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise UserError(f"{self.path} is a folder; give the path of the index file (e.g. library/index.sqlite).")
        if not model_id:
            raise UserError("The index needs a model id (the checkpoint that makes the embeddings).")
        self.model_id = str(model_id)
        _create_private(self.path)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
            self._db.execute("PRAGMA page_size=16384")             # new files only: ~5 rows of 2-3 KB per page
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")         # WAL + NORMAL: durable across app crashes
            self._db.execute("PRAGMA journal_size_limit=67108864")  # truncate the WAL to 64 MB after checkpoints
            with self._db:
                self._db.executescript(_SCHEMA)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as err:
            raise UserError(f"{self.path} is not a usable embedding index ({err}).") from None
        self._lock = threading.RLock()
        self._backend = backend or ExactCosine()
        self._ids: list[str] | None = None                         # cache: row order of the backend
        self._data_version = None

    # -- writing -------------------------------------------------------------------------------------------------

    @property
    def dim(self) -> int | None:
        """Embedding length of this model's rows (None while empty)."""
        with self._lock:
            row = self._db.execute("SELECT dim FROM studies WHERE model_id=? LIMIT 1", (self.model_id,)).fetchone()
        return None if row is None else int(row[0])

    def _row(self, id, embedding, sha256, source, path, labels, report, meta, dim) -> tuple:
        if not isinstance(id, str) or not id.strip():
            raise UserError("A study id must be a non-empty string.")
        vector = np.asarray(embedding, dtype=np.float32)
        if vector.ndim != 1 or vector.size == 0:
            raise UserError(f"An embedding must be a 1-D vector, got shape {vector.shape}.")
        if dim is not None and vector.size != dim:
            raise UserError(f"This index holds {dim}-d embeddings for model {self.model_id!r}, got {vector.size}-d.")
        if not np.all(np.isfinite(vector)) or not np.any(vector):
            raise UserError("An embedding must be finite and not all zeros.")
        if source not in SOURCES:
            raise UserError(f"source must be 'phantom' or 'file', got {source!r}.")
        if not isinstance(sha256, str) or len(sha256) != 64:
            raise UserError("sha256 must be a 64-character hex digest (see file_sha256).")
        added_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        return (id, self.model_id, source, None if path is None else str(path), sha256.lower(), _labels_json(labels),
                report, json.dumps(meta or {}), vector.astype("<f4").tobytes(), int(vector.size), added_at)

    def _insert(self, row: tuple) -> str:
        """Insert one row (inside the caller's transaction) unless its content is already indexed; return its id."""
        id, sha256 = row[0], row[4]
        existing = self._db.execute("SELECT id FROM studies WHERE model_id=? AND content_sha256=?",
                                    (self.model_id, sha256)).fetchone()
        if existing is not None:
            return existing[0]
        if self._db.execute("SELECT 1 FROM studies WHERE model_id=? AND id=?", (self.model_id, id)).fetchone():
            raise UserError(f"The id {id!r} is already used by a different study in this library.")
        self._db.execute("INSERT INTO studies (id, model_id, source, path, content_sha256, labels, report, meta, "
                         "embedding, dim, added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
        return id

    def add(self, id: str, embedding, *, sha256: str, source: str, path=None, labels=None, report: str | None = None,
            meta: dict | None = None) -> str:
        """Add one study and commit. Idempotent by content: if `sha256` is already indexed for this model, nothing
        is written and the existing study's id is returned. Returns the id under which the study is stored."""
        with self._lock:
            row = self._row(id, embedding, sha256, source, path, labels, report, meta, self.dim)
            with self._db:
                stored = self._insert(row)
            if stored == id:
                self._ids = None
            return stored

    def add_many(self, studies: Iterable[dict]) -> list[str]:
        """Add several studies (dicts of `add`'s arguments) in ONE transaction: all or nothing. Returns the ids."""
        with self._lock:
            dim, stored = self.dim, []
            with self._db:
                for s in studies:
                    row = self._row(s["id"], s["embedding"], s["sha256"], s["source"], s.get("path"),
                                    s.get("labels"), s.get("report"), s.get("meta"), dim)
                    dim = row[-2]
                    stored.append(self._insert(row))
            self._ids = None
            return stored

    # -- reading -------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM studies WHERE model_id=?", (self.model_id,)).fetchone()[0]

    def __contains__(self, id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM studies WHERE model_id=? AND id=?",
                                    (self.model_id, id)).fetchone() is not None

    def ids(self) -> list[str]:
        """Study ids of this model in insertion order."""
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT id FROM studies WHERE model_id=? ORDER BY rowid",
                                                   (self.model_id,))]

    def get(self, id: str) -> IndexedStudy | None:
        """The stored study, or None if this model's library has no such id."""
        with self._lock:
            row = self._db.execute("SELECT id, model_id, source, path, content_sha256, labels, report, meta, "
                                   "embedding, added_at FROM studies WHERE model_id=? AND id=?",
                                   (self.model_id, id)).fetchone()
        if row is None:
            return None
        return IndexedStudy(id=row[0], model_id=row[1], source=row[2], path=row[3], sha256=row[4],
                            labels=None if row[5] is None else json.loads(row[5]), report=row[6],
                            meta=json.loads(row[7]), embedding=np.frombuffer(row[8], dtype="<f4").copy(),
                            added_at=row[9])

    def find_sha256(self, sha256: str) -> str | None:
        """The id of the study with this content hash, or None."""
        with self._lock:
            row = self._db.execute("SELECT id FROM studies WHERE model_id=? AND content_sha256=?",
                                   (self.model_id, sha256.lower())).fetchone()
        return None if row is None else row[0]

    def _load(self) -> None:
        """(Re)build the backend from all rows when stale: after our own add, or another process's commit."""
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if self._ids is not None and version == self._data_version:
            return
        n = len(self)
        dim = self.dim or 0
        matrix = np.empty((n, dim), dtype=np.float32)               # filled row by row: no list of blobs in memory
        ids = []
        cursor = self._db.execute("SELECT id, embedding FROM studies WHERE model_id=? ORDER BY rowid",
                                  (self.model_id,))
        for i, (id, blob) in enumerate(cursor):
            matrix[i] = np.frombuffer(blob, dtype="<f4")
            ids.append(id)
        matrix /= np.sqrt(np.einsum("ij,ij->i", matrix, matrix))[:, None]   # in place: no second (N, D) copy
        self._backend.build(matrix)
        self._ids, self._data_version = ids, version

    def search(self, query, k: int = 10) -> list[tuple[str, float]]:
        """The k studies most similar to `query` (D,) by cosine similarity, best first: [(id, score), ...]."""
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise UserError(f"k must be a positive whole number, got {k!r}.")
        vector = np.asarray(query, dtype=np.float32)
        with self._lock:
            dim = self.dim
            if dim is None:
                return []
            if vector.shape != (dim,):
                raise UserError(f"The query must be a {dim}-d vector for model {self.model_id!r}, "
                                f"got shape {vector.shape}.")
            norm = float(np.linalg.norm(vector))
            if not np.isfinite(norm) or norm == 0:
                raise UserError("The query embedding must be finite and not all zeros.")
            self._load()
            rows, scores = self._backend.search(vector / norm, int(k))
            return [(self._ids[r], float(s)) for r, s in zip(rows, scores)]

    # -- lifetime ------------------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "EmbeddingIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
