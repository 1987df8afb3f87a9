"""engine.library: the shipped demo library (parameters only) and its on-demand, cached rendering."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine.errors import UserError
from engine.labels import LABELS
from engine.library import DEFAULT_LIBRARY_PATH, LIBRARY_SEED_MIN, DemoLibrary
from engine.volume import DEMO_SHAPE_ZYX, DEMO_SPACING_XYZ


@pytest.fixture(scope="module")
def library() -> DemoLibrary:
    return DemoLibrary.load()


def test_shipped_library_is_parameters_with_reports_and_realistic_labels(library):
    raw = json.loads(DEFAULT_LIBRARY_PATH.read_text())
    assert len(raw) == len(library) >= 200
    assert DEFAULT_LIBRARY_PATH.stat().st_size < 5 * 2**20          # parameters, not voxels
    ids = [s.id for s in library]
    assert ids[0] == "demo-0001" and len(set(ids)) == len(ids)
    assert min(s.seed for s in library) >= LIBRARY_SEED_MIN            # disjoint from training/test seeds
    assert len({s.seed for s in library}) == len(library)
    for s in library:
        assert set(s.labels) <= set(LABELS)
        assert {f.label for f in s.findings} == set(s.labels)         # every label is drawn, nothing else
        assert s.report_findings.strip() and s.report_impression.strip()
        assert s.label_vector.shape == (18,) and s.label_vector.sum() == len(s.labels)
    # Label sets come from CT-RATE's table: varied, several labels per study on average, some normal studies.
    counts = np.stack([s.label_vector for s in library]).sum(0)
    assert (counts > 0).sum() >= 14
    assert 1.0 < counts.sum() / len(library) < 8.0


def test_get_unknown_study_is_one_sentence(library):
    with pytest.raises(UserError, match="no study 'demo-9999'"):
        library.get("demo-9999")


def test_volume_is_the_phantom_of_the_study_and_is_cached(library):
    from engine.phantom import make_study

    study = library.studies[1]
    volume = library.volume(study.id)
    assert volume.array.shape == DEMO_SHAPE_ZYX and volume.array.dtype == np.float32
    assert volume.spacing == pytest.approx(DEMO_SPACING_XYZ)
    assert study.id in volume.source
    assert library.volume(study.id) is volume                          # served from the cache
    # The stored parameters reproduce the study made from its seed on the demo grid: labels, findings, report, voxels.
    original = make_study(study.seed)
    assert tuple(original.labels) == study.labels
    assert [f.to_json() for f in original.findings] == [f.to_json() for f in study.findings]
    assert (original.report.findings, original.report.impression) == (study.report_findings, study.report_impression)
    assert np.array_equal(original.volume.array, volume.array)


def test_lru_cache_keeps_only_the_last_few(library):
    small = DemoLibrary(library.studies[:4], shape_zyx=(16, 32, 32), cache_size=2)  # a small grid: fast renders
    first = small.volume(small.studies[0].id)
    small.volume(small.studies[1].id)
    small.volume(small.studies[2].id)                                  # evicts the first
    again = small.volume(small.studies[0].id)
    assert again is not first and np.array_equal(again.array, first.array)   # re-rendered, deterministic


def test_round_trip_through_json(tmp_path, library):
    path = DemoLibrary(library.studies[:5]).save(tmp_path / "lib.json")
    loaded = DemoLibrary.load(path)
    assert loaded.studies == library.studies[:5]
    with pytest.raises(UserError, match="does not exist"):
        DemoLibrary.load(tmp_path / "missing.json")
