"""The demo library: a few hundred phantom studies stored as parameters (seed + findings + report), not voxels.

assets/library/studies.json (written by `python -m training.build_library`) is a list of
    {"id": "demo-0001", "seed": int, "labels": [label, ...], "findings": [Finding.to_json(), ...],
     "report": {"findings": str, "impression": str}}
A study's volume is rendered on demand by the phantom (engine.phantom.render_phantom(findings, seed) on the demo grid,
HU, (z, y, x), LPS) and the last few are kept in an LRU cache, so the library costs kilobytes on disk and a few
volumes in memory.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import UserError
from engine.labels import LABELS, Finding, check_labels, label_vector
from engine.settings import library_studies
from engine.volume import DEMO_SHAPE_ZYX, Volume

DEFAULT_LIBRARY_PATH = library_studies()  # a path inside the checkout (no environment variable)
# Library seeds start here; every training / evaluation seed is below it (see training/build_library.py).
LIBRARY_SEED_MIN = 1_000_000


@dataclass(frozen=True)
class LibraryStudy:
    """One demo study: the phantom's parameters and the report written from the same findings."""
    id: str
    seed: int
    labels: tuple[str, ...]
    findings: tuple[Finding, ...]
    report_findings: str
    report_impression: str

    @property
    def report_text(self) -> str:
        """The full report: Findings then Impression."""
        return f"Findings: {self.report_findings}\n\nImpression: {self.report_impression}"

    @property
    def label_vector(self) -> np.ndarray:
        """0/1 int vector of the 18 CT-RATE labels in CT-CLIP order."""
        return label_vector(self.labels)

    @property
    def label_dict(self) -> dict[str, int]:
        present = set(self.labels)
        return {name: int(name in present) for name in LABELS}

    def to_json(self) -> dict:
        return {"id": self.id, "seed": self.seed, "labels": list(self.labels),
                "findings": [f.to_json() for f in self.findings],
                "report": {"findings": self.report_findings, "impression": self.report_impression}}

    @staticmethod
    def from_json(d: dict) -> "LibraryStudy":
        return LibraryStudy(id=str(d["id"]), seed=int(d["seed"]), labels=tuple(check_labels(d["labels"])),
                            findings=tuple(Finding.from_json(f) for f in d["findings"]),
                            report_findings=d["report"]["findings"], report_impression=d["report"]["impression"])


class DemoLibrary:
    """The demo studies, with their volumes rendered on demand (LRU cache of `cache_size` volumes, thread-safe)."""

    def __init__(self, studies: list[LibraryStudy], *, shape_zyx: tuple[int, int, int] = DEMO_SHAPE_ZYX,
                 spacing_xyz: tuple[float, float, float] | None = None, cache_size: int = 4):
        """shape_zyx: the render grid (default the demo grid 64 x 128 x 128); spacing_xyz: mm, None = the phantom's
        chest field of view (350 x 350 x 300 mm) over that grid (DEMO_SPACING_XYZ on the demo grid)."""
        self.studies = list(studies)
        self.shape_zyx = tuple(shape_zyx)
        self.spacing_xyz = None if spacing_xyz is None else tuple(spacing_xyz)
        self.cache_size = cache_size
        self._by_id = {s.id: s for s in self.studies}
        if len(self._by_id) != len(self.studies):
            raise ValueError("duplicate study ids in the demo library")
        self._cache: OrderedDict[str, Volume] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path=DEFAULT_LIBRARY_PATH, **kwargs) -> "DemoLibrary":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"The demo library {str(path)!r} does not exist; build it with "
                            "`python -m training.build_library`.")
        with open(path, encoding="utf-8") as f:
            return cls([LibraryStudy.from_json(d) for d in json.load(f)], **kwargs)

    def save(self, path=DEFAULT_LIBRARY_PATH) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump([s.to_json() for s in self.studies], f, indent=1)
            f.write("\n")
        return path

    def __len__(self) -> int:
        return len(self.studies)

    def __iter__(self):
        return iter(self.studies)

    def __contains__(self, study_id: str) -> bool:
        return study_id in self._by_id

    def get(self, study_id: str) -> LibraryStudy:
        try:
            return self._by_id[study_id]
        except KeyError:
            raise UserError(f"There is no study {study_id!r} in the demo library.") from None

    def volume(self, study_id: str) -> Volume:
        """The study's phantom volume (HU, (z, y, x), demo grid); rendered once, then served from the LRU cache.

        The returned Volume is shared with the cache: treat it as read-only.
        """
        study = self.get(study_id)
        with self._lock:
            if study_id in self._cache:
                self._cache.move_to_end(study_id)
                return self._cache[study_id]
        from engine.phantom import render_phantom  # the phantom is only needed once a volume is asked for

        volume = render_phantom(list(study.findings), study.seed, shape_zyx=self.shape_zyx,
                                spacing_xyz=self.spacing_xyz)
        volume.source = f"demo library {study.id} (phantom seed {study.seed})"
        with self._lock:
            self._cache[study_id] = volume
            self._cache.move_to_end(study_id)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return volume
