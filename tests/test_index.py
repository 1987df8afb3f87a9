"""engine/index.py: a persistent SQLite library of embeddings with exact cosine search."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from engine.errors import UserError
from engine.index import EmbeddingIndex, file_sha256
from engine.labels import LABELS

ROOT = Path(__file__).resolve().parents[1]


def _sha(i: int) -> str:
    return f"{i:064x}"


def _fill(index: EmbeddingIndex, embeddings: np.ndarray, start: int = 0) -> list[str]:
    return [index.add(f"study-{start + i}", e, sha256=_sha(start + i), source="phantom") for i, e in
            enumerate(embeddings)]


def test_add_get_and_idempotent_readd(tmp_path):
    rng = np.random.default_rng(0)
    with EmbeddingIndex(tmp_path / "lib.sqlite", model_id="m1") as index:
        e = rng.normal(size=16).astype(np.float32)
        stored = index.add("a", e, sha256=_sha(1), source="file", path="/data/a.nii.gz",
                           labels={"Cardiomegaly": 1}, report="Heart enlarged.", meta={"spacing": [1, 1, 2]})
        assert stored == "a"
        # the same content under another id: no duplicate, the existing id comes back
        assert index.add("a-again", e, sha256=_sha(1), source="file") == "a"
        assert len(index) == 1 and index.ids() == ["a"] and "a" in index and "a-again" not in index
        row = index.get("a")
        assert row.source == "file" and row.path == "/data/a.nii.gz" and row.report == "Heart enlarged."
        assert row.labels == {name: int(name == "Cardiomegaly") for name in LABELS}
        assert row.meta == {"spacing": [1, 1, 2]} and row.model_id == "m1"
        np.testing.assert_array_equal(row.embedding, e)
        assert index.get("missing") is None and index.find_sha256(_sha(1)) == "a"
        # the same id for different content is refused
        with pytest.raises(UserError, match="already used"):
            index.add("a", e, sha256=_sha(2), source="file")


def test_persists_across_reopen_in_wal_mode(tmp_path):
    path = tmp_path / "lib.sqlite"
    emb = np.random.default_rng(1).normal(size=(5, 8))
    with EmbeddingIndex(path, model_id="m") as index:
        _fill(index, emb)
    assert path.is_file()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with EmbeddingIndex(path, model_id="m") as index:
        assert index.ids() == [f"study-{i}" for i in range(5)]
        assert index.search(emb[3], k=1)[0][0] == "study-3"


def test_interrupted_run_keeps_what_was_indexed(tmp_path):
    """An indexing process that dies after 3 studies (no close, no cleanup: os._exit) leaves those 3 indexed."""
    path = tmp_path / "lib.sqlite"
    script = textwrap.dedent(f"""
        import os
        import numpy as np
        from engine.index import EmbeddingIndex
        index = EmbeddingIndex({str(path)!r}, model_id="m")
        try:
            for i, e in enumerate(np.random.default_rng(2).normal(size=(5, 8))):
                if i == 3:
                    raise RuntimeError("indexing run killed")
                index.add(f"study-{{i}}", e, sha256=f"{{i:064x}}", source="file")
        finally:
            os._exit(1)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=60)
    assert result.returncode == 1
    with EmbeddingIndex(path, model_id="m") as index:
        assert index.ids() == ["study-0", "study-1", "study-2"]


def test_add_many_is_all_or_nothing(tmp_path):
    index = EmbeddingIndex(tmp_path / "lib.sqlite")
    good = [{"id": f"s{i}", "embedding": np.ones(4) * (i + 1), "sha256": _sha(i), "source": "phantom"}
            for i in range(3)]
    bad = good + [{"id": "s9", "embedding": np.ones(5), "sha256": _sha(9), "source": "phantom"}]
    with pytest.raises(UserError):
        index.add_many(bad)
    assert len(index) == 0
    assert index.add_many(good) == ["s0", "s1", "s2"] and len(index) == 3


def test_search_equals_brute_force_ranking(tmp_path):
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(300, 32)).astype(np.float32)
    index = EmbeddingIndex(tmp_path / "lib.sqlite", model_id="m")
    index.add_many([{"id": f"study-{i}", "embedding": e, "sha256": _sha(i), "source": "phantom"}
                    for i, e in enumerate(emb)])
    unit = emb.astype(np.float64) / np.linalg.norm(emb, axis=1, keepdims=True)
    for q in rng.normal(size=(5, 32)):
        cosine = unit @ (q / np.linalg.norm(q))
        order = np.argsort(-cosine)[:20]
        got = index.search(q * 7.0, k=20)                          # the query's scale does not matter
        assert [g[0] for g in got] == [f"study-{i}" for i in order]
        np.testing.assert_allclose([g[1] for g in got], cosine[order], atol=1e-5)
    assert len(index.search(emb[0], k=1000)) == 300                # k beyond the library: everything


def test_cache_follows_adds_from_this_and_other_connections(tmp_path):
    path = tmp_path / "lib.sqlite"
    rng = np.random.default_rng(4)
    first, second = EmbeddingIndex(path, model_id="m"), EmbeddingIndex(path, model_id="m")
    _fill(first, rng.normal(size=(10, 8)))
    query = rng.normal(size=8)
    assert len(first.search(query, k=50)) == 10                    # matrix now cached
    first.add("near", query, sha256=_sha(100), source="file")      # own add invalidates the cache
    assert first.search(query, k=1)[0][0] == "near"
    other = -query
    second.add("other-process", other, sha256=_sha(101), source="file")  # a commit by another connection
    assert first.search(other, k=1)[0][0] == "other-process"


def test_model_ids_never_mix(tmp_path):
    path = tmp_path / "lib.sqlite"
    a, b = EmbeddingIndex(path, model_id="ckpt-a"), EmbeddingIndex(path, model_id="ckpt-b")
    _fill(a, np.eye(4))
    b.add("study-0", np.ones(6), sha256=_sha(0), source="phantom")  # same id and content, other model, other dim
    assert len(a) == 4 and len(b) == 1 and b.dim == 6 and a.dim == 4
    assert [i for i, _ in b.search(np.ones(6), k=10)] == ["study-0"]
    assert {i for i, _ in a.search(np.ones(4), k=10)} == {f"study-{i}" for i in range(4)}


def test_bad_inputs_raise_user_error(tmp_path):
    index = EmbeddingIndex(tmp_path / "lib.sqlite")
    assert index.search(np.ones(4), k=3) == []                     # empty library
    index.add("a", np.ones(4), sha256=_sha(1), source="file")
    bad_adds = [
        dict(id="b", embedding=np.ones(5), sha256=_sha(2), source="file"),            # wrong dimension
        dict(id="b", embedding=np.zeros(4), sha256=_sha(2), source="file"),           # zero vector
        dict(id="b", embedding=[1, np.nan, 0, 0], sha256=_sha(2), source="file"),     # NaN
        dict(id="b", embedding=np.ones((2, 2)), sha256=_sha(2), source="file"),       # not 1-D
        dict(id="b", embedding=np.ones(4), sha256=_sha(2), source="scanner"),         # unknown source
        dict(id="b", embedding=np.ones(4), sha256="abc", source="file"),              # not a sha256
        dict(id="", embedding=np.ones(4), sha256=_sha(2), source="file"),             # empty id
        dict(id="b", embedding=np.ones(4), sha256=_sha(2), source="file", labels={"Nope": 1}),
        dict(id="b", embedding=np.ones(4), sha256=_sha(2), source="file", labels=[1, 0]),
    ]
    for kwargs in bad_adds:
        with pytest.raises(UserError):
            index.add(kwargs.pop("id"), kwargs.pop("embedding"), **kwargs)
    for query, k in [(np.ones(3), 1), (np.zeros(4), 1), (np.ones(4), 0)]:
        with pytest.raises(UserError):
            index.search(query, k=k)
    assert len(index) == 1
    with pytest.raises(UserError, match="folder"):
        EmbeddingIndex(tmp_path)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(UserError):
        EmbeddingIndex(junk)


def test_file_sha256_files_folders_and_zips(tmp_path, lung1_path):
    import hashlib
    assert file_sha256(lung1_path) == hashlib.sha256(lung1_path.read_bytes()).hexdigest()
    series = tmp_path / "series"
    (series / "sub").mkdir(parents=True)
    (series / "IM0001.dcm").write_bytes(b"slice one")
    (series / "sub" / "IM0002.dcm").write_bytes(b"slice two")
    (series / ".DS_Store").write_bytes(b"finder junk")
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "b").write_bytes(b"slice one")
    (renamed / "a").write_bytes(b"slice two")
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("x/2.dcm", b"slice two")
        z.writestr("x/1.dcm", b"slice one")
        z.writestr("__MACOSX/x/._1.dcm", b"resource fork")
    digest = file_sha256(series)
    assert digest == file_sha256(renamed) == file_sha256(archive)    # names, order, zipping do not matter
    (renamed / "a").write_bytes(b"slice 2")
    assert file_sha256(renamed) != digest                            # content does
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError):
        file_sha256(empty)
    with pytest.raises(UserError):
        file_sha256(tmp_path / "missing.nii.gz")
