"""Phantom training data for the demo CT CLIP: a resumable on-disk cache and a torch Dataset.

The cache (one directory per split) holds
- `volumes.npy`: int16 HU, shape (N, z, y, x), opened as a numpy memmap (written in place, so an interrupted
  build keeps every volume it finished);
- `studies.jsonl`: one JSON line per finished study, in completion order: {"index", "seed", "kind", "labels",
  "report", "query", "real_report"} ("kind" is "generated" or "real"; "real_report" only for real rows);
- `meta.json`: the plan (grid, spacing, counts, seed ranges); a resume refuses a cache built with another plan.

Seeds (every phantom is f(seed, findings), so disjoint seeds mean unseen studies):
- generated training studies:        seeds TRAIN_SEED_BASE + i,        i in [0, 500_000)
- training studies for real reports: seeds REAL_SEED_BASE + row,       row in [0, 800)  (the CSV row); when the
  phantom cannot draw a seed's findings, REAL_SEED_BASE + row + k * 1000 (k < 5). A generated seed that fails is
  logged as {"failed": message} and skipped.
- held-out test studies:             seeds TEST_SEED_BASE + i,         i in [0, 100_000)
- the demo library (engine/library.py) uses seeds >= 1_000_000; nothing here comes near it.

Real reports: each of the 800 real CT-RATE reports is paired with a phantom rendered from ITS hand-set label
vector (findings sampled from those labels), so the text tower sees real radiology wording next to the
generated reports. The pairing is label-level (the real report's sides and sizes are not those drawn).

The Dataset yields (volume tensor in model units (1, z, y, x) float32, text str). The text is drawn per item
among the full generated report ("Findings: ... Impression: ..."), the short query, and for real rows the real
report. Augmentation: small integer shifts (air padding) and mild intensity noise/scale. Never a flip: sides
("right pleural effusion") are in the text.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from engine.labels import LABELS
from engine.settings import shared_data
from engine.transforms import to_model_tensor
from engine.volume import DEMO_SHAPE_ZYX, DEMO_SPACING_XYZ, Volume

TRAIN_SEED_BASE = 0
REAL_SEED_BASE = 500_000
TEST_SEED_BASE = 900_000
LIBRARY_SEED_MIN = 1_000_000
REAL_RETRY_STRIDE = 1_000          # a real row whose phantom cannot be drawn retries seed + k * 1000 (k < 5)
REAL_RETRIES = 5
TEST_PLAN_SIZE = 320               # test seeds rendered; evaluation uses the first 300 that render
AIR_HU = -1000


@dataclass
class CachePlan:
    """What a cache directory holds. Grid (z, y, x) voxels and spacing (x, y, z) mm are the phantom's render grid."""
    split: str                      # "train" | "test"
    n_generated: int
    n_real: int = 0                 # first n_real rows of the real-report CSV (train only)
    shape_zyx: tuple[int, int, int] = DEMO_SHAPE_ZYX
    spacing_xyz: tuple[float, float, float] = DEMO_SPACING_XYZ

    def __post_init__(self):
        self.shape_zyx = tuple(int(v) for v in self.shape_zyx)
        self.spacing_xyz = tuple(float(v) for v in self.spacing_xyz)
        if self.split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {self.split!r}")
        if self.split == "test" and self.n_real:
            raise ValueError("the test split holds generated studies only (the real reports are training text)")
        seed_base = TRAIN_SEED_BASE if self.split == "train" else TEST_SEED_BASE
        if seed_base + self.n_generated > (REAL_SEED_BASE if self.split == "train" else LIBRARY_SEED_MIN):
            raise ValueError("too many generated studies for the split's seed range")

    @property
    def n_total(self) -> int:
        return self.n_generated + self.n_real

    def job(self, index: int) -> dict:
        """The seed, kind and (for real rows) CSV row of study `index`."""
        if index < self.n_generated:
            base = TRAIN_SEED_BASE if self.split == "train" else TEST_SEED_BASE
            return {"index": index, "seed": base + index, "kind": "generated", "row": None}
        row = index - self.n_generated
        return {"index": index, "seed": REAL_SEED_BASE + row, "kind": "real", "row": row}


def real_reports_csv() -> Path:
    """The 800 real CT-RATE reports with their hand-set labels (under $CT_SHARED_DATA, engine.settings)."""
    return shared_data() / "ctrate_reports" / "reports_with_labels.csv"


def load_real_reports(csv_path: Path | None = None) -> pd.DataFrame:
    """The 800 real CT-RATE reports: columns text ("Findings: ... Impression: ...") and labels (list of names)."""
    df = pd.read_csv(csv_path or real_reports_csv())

    def text(r):
        findings = str(r["findings"]).strip()
        impression = r["impression"]
        if isinstance(impression, str) and impression.strip():
            return f"Findings: {findings} Impression: {impression.strip()}"
        return f"Findings: {findings}"
    return pd.DataFrame({
        "text": [text(r) for _, r in df.iterrows()],
        "labels": [[n for n in LABELS if int(r[n]) == 1] for _, r in df.iterrows()],
    })


# ---- rendering (runs in worker processes) ----------------------------------------------------------------------

_WORKER: dict = {}


def _worker_init(plan_dict: dict, real_csv: str | None):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    _WORKER["plan"] = CachePlan(**plan_dict)
    _WORKER["real"] = load_real_reports(Path(real_csv)) if real_csv else None


def _render(job: dict) -> tuple[dict, np.ndarray]:
    """Render one study: (record, int16 HU (z, y, x))."""
    from engine.phantom import make_study
    from engine.report_writer import write_query

    from engine.errors import UserError

    plan: CachePlan = _WORKER["plan"]
    real_text = None
    labels = None
    if job["kind"] == "real":
        real = _WORKER["real"].iloc[job["row"]]
        labels, real_text = list(real["labels"]), real["text"]
    # A real report must get its phantom: if the phantom cannot draw a seed's findings, try the next seeds of the row
    # (REAL_SEED_BASE + row + k * REAL_RETRY_STRIDE). A generated seed that fails is recorded as failed and skipped.
    attempts = REAL_RETRIES if job["kind"] == "real" else 1
    for k in range(attempts):
        seed = job["seed"] + k * REAL_RETRY_STRIDE
        try:
            study = make_study(seed, labels=labels, shape_zyx=plan.shape_zyx, spacing_xyz=plan.spacing_xyz,
                               with_report=True)
            break
        except (UserError, ValueError, IndexError, RuntimeError) as err:   # a seed the phantom cannot draw
            error = f"{type(err).__name__}: {err}"
    else:
        return {"index": job["index"], "seed": job["seed"], "kind": job["kind"], "failed": error}, None
    rng = np.random.default_rng([seed, 7])
    report = study.report.text if hasattr(study.report, "text") else str(study.report)
    record = {
        "index": job["index"], "seed": seed, "kind": job["kind"],
        "labels": [n for n in LABELS if n in set(study.labels)],
        "report": report, "query": write_query(study.findings, rng), "real_report": real_text,
    }
    hu = np.clip(np.rint(study.volume.array), -32768, 32767).astype(np.int16)
    return record, hu


# ---- the cache ---------------------------------------------------------------------------------------------------

def read_records(root: Path) -> dict[int, dict]:
    """Finished studies by index (a torn last line from an interrupted build is ignored)."""
    path = Path(root) / "studies.jsonl"
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[rec["index"]] = rec
    return out


def build_cache(root: Path, plan: CachePlan, workers: int = 2, real_csv: Path | None = None,
                progress: bool = True) -> Path:
    """Render every study of `plan` not yet in `root` (resumes an interrupted build). Returns `root`.
    real_csv: the real reports (default real_reports_csv())."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    meta_path, vol_path = root / "meta.json", root / "volumes.npy"
    meta = {"plan": asdict(plan), "seed_ranges": {"train": TRAIN_SEED_BASE, "real": REAL_SEED_BASE,
                                                  "test": TEST_SEED_BASE, "library_min": LIBRARY_SEED_MIN}}
    meta["plan"]["shape_zyx"] = list(plan.shape_zyx)
    meta["plan"]["spacing_xyz"] = list(plan.spacing_xyz)
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old["plan"] != meta["plan"]:
            raise ValueError(f"{root} holds a cache built with another plan ({old['plan']}); use another directory")
        volumes = np.load(vol_path, mmap_mode="r+")
    else:
        volumes = np.lib.format.open_memmap(vol_path, mode="w+", dtype=np.int16, shape=(plan.n_total, *plan.shape_zyx))
        meta_path.write_text(json.dumps(meta, indent=1))
    done = read_records(root)
    log_path = root / "studies.jsonl"
    if log_path.exists() and not log_path.read_text().endswith("\n"):     # drop a line torn by an interruption
        log_path.write_text("".join(json.dumps(done[i]) + "\n" for i in sorted(done)))
    # failed seeds are tried again on every build (the phantom may have been fixed since); the last line wins
    todo = [plan.job(i) for i in range(plan.n_total) if i not in done or "failed" in done[i]]
    if not todo:
        return root
    needs_real = any(j["kind"] == "real" for j in todo)
    init_args = (asdict(plan), str(real_csv or real_reports_csv()) if needs_real else None)
    bar = tqdm(total=plan.n_total, initial=plan.n_total - len(todo), desc=f"phantoms ({plan.split})", unit="study",
               disable=not progress)
    with open(root / "studies.jsonl", "a") as log:
        def store(record, hu):
            if hu is not None:
                volumes[record["index"]] = hu
                volumes.flush()          # the volume is on disk before its line says it is done
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.update(1)
        if workers <= 1:
            _worker_init(*init_args)
            for job in todo:
                store(*_render(job))
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(workers, initializer=_worker_init, initargs=init_args) as pool:
                for record, hu in pool.imap_unordered(_render, todo, chunksize=1):
                    store(record, hu)
    bar.close()
    return root


class PhantomCache:
    """Read side of a finished (or partly finished) cache: records in index order and the volume memmap."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.meta = json.loads((self.root / "meta.json").read_text())
        self.volumes = np.load(self.root / "volumes.npy", mmap_mode="r")
        recs = read_records(self.root)
        self.records = [recs[i] for i in sorted(recs) if "failed" not in recs[i]]
        self.failed = [recs[i] for i in sorted(recs) if "failed" in recs[i]]
        self.spacing_xyz = tuple(self.meta["plan"]["spacing_xyz"])

    def __len__(self):
        return len(self.records)

    def hu(self, i: int) -> np.ndarray:
        """float32 HU (z, y, x) of the i-th finished study."""
        return np.asarray(self.volumes[self.records[i]["index"]], dtype=np.float32)

    def label_matrix(self) -> np.ndarray:
        """(N, 18) 0/1 int labels in CT-CLIP order."""
        m = np.zeros((len(self), len(LABELS)), dtype=np.int64)
        for r, rec in enumerate(self.records):
            for name in rec["labels"]:
                m[r, LABELS.index(name)] = 1
        return m


def hu_to_model(hu: np.ndarray, spacing_xyz, preprocessing) -> torch.Tensor:
    """A cached HU array (z, y, x) at `spacing_xyz` mm -> the model's input tensor (1, z, y, x) by the engine's one
    path (engine.transforms.to_model_tensor; on the preset's own grid its resampling step is the identity)."""
    return to_model_tensor(Volume(array=hu, spacing=tuple(float(s) for s in spacing_xyz)), preprocessing)


@dataclass
class TextMix:
    """Probabilities of each text kind per item (renormalised over the kinds a row has)."""
    report: float = 0.5
    query: float = 0.3
    real_report: float = 0.5


class CTCLIPDataset(torch.utils.data.Dataset):
    """(volume (1, z, y, x) float32 in model units, text[, second text][, labels (18,) 0/1 float]) from a
    PhantomCache.

    Text and augmentation are drawn from rng([seed, epoch, i]): deterministic given the epoch, so a resumed run
    sees the same stream. `augment` shifts by up to `max_shift` voxels per axis (air fill) and adds intensity noise.
    """

    def __init__(self, cache: PhantomCache, preset, augment: bool = True, seed: int = 0,
                 text_mix: TextMix = TextMix(), max_shift: tuple[int, int, int] = (2, 4, 4), noise_hu: float = 15.0,
                 paired_text: bool = False, with_labels: bool = False):
        self.cache, self.preset, self.augment, self.seed, self.paired_text = cache, preset, augment, seed, paired_text
        self.with_labels = with_labels
        self.label_matrix = torch.from_numpy(cache.label_matrix()).float() if with_labels else None
        self.text_mix, self.max_shift, self.noise_hu = text_mix, max_shift, noise_hu
        self.epoch = 0

    def __len__(self):
        return len(self.cache)

    def _kind(self, i: int, rng: np.random.Generator) -> str:
        rec = self.cache.records[i]
        kinds = ["report", "query"] + (["real_report"] if rec.get("real_report") else [])
        p = np.array([getattr(self.text_mix, k) for k in kinds], dtype=np.float64)
        return kinds[rng.choice(len(kinds), p=p / p.sum())]

    def second_text(self, i: int, kind: str, rng: np.random.Generator) -> str:
        """Another description of the same study for the text-text term: the query for a report, else a report."""
        rec = self.cache.records[i]
        if kind != "query":
            return rec["query"]
        reports = ["report"] + (["real_report"] if rec.get("real_report") else [])
        return rec[reports[rng.integers(len(reports))]]

    def augment_hu(self, hu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Integer shift with air fill (no flips: left/right is in the text) + intensity scale/offset + noise."""
        out = np.full_like(hu, AIR_HU)
        src, dst = [], []
        for n, m in zip(hu.shape, self.max_shift):
            s = int(rng.integers(-m, m + 1)) if m else 0
            src.append(slice(max(0, -s), n - max(0, s)))
            dst.append(slice(max(0, s), n - max(0, -s)))
        out[tuple(dst)] = hu[tuple(src)]
        body = out > -900
        out = np.where(body, out * rng.uniform(0.97, 1.03) + rng.uniform(-20, 20), out)
        out += rng.standard_normal(size=out.shape, dtype=np.float32) * np.float32(self.noise_hu)
        return out.astype(np.float32)

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.epoch, i])
        hu = self.cache.hu(i)
        if self.augment:
            hu = self.augment_hu(hu, rng)
        kind = self._kind(i, rng)
        x = hu_to_model(hu, self.cache.spacing_xyz, self.preset)
        item = (x, self.cache.records[i][kind])
        if self.paired_text:
            item += (self.second_text(i, kind, rng),)
        if self.with_labels:
            item += (self.label_matrix[i],)
        return item

