"""Phantom training data for the demo CT CLIP: a resumable on-disk cache and a torch Dataset.

The cache (one directory per split) holds
- `volumes.npy`: int16 HU, shape (N, z, y, x), opened as a numpy memmap (written in place, so an interrupted
  build keeps every volume it finished);
- `studies.jsonl`: one JSON line per finished study, in completion order: {"index", "seed", "kind", "labels",
  "report", "query", "real_report"} ("kind" is "generated" or "real"; "real_report" only for real rows);
- `meta.json`: the plan (grid, spacing, counts, the phantom's revision, seed ranges); a resume refuses a cache built
  with another plan, and every reader refuses one of another phantom revision (engine.phantom.PHANTOM_REVISION: the
  same seed draws another picture).

Seeds (every phantom is f(seed, findings), so disjoint seeds mean unseen studies):
- generated training studies:        seeds TRAIN_SEED_BASE + i,        i in [0, 500_000)
- training studies for real reports: seeds REAL_SEED_BASE + row,       row in [0, 800)  (the CSV row); when the
  phantom cannot draw a seed's findings, REAL_SEED_BASE + row + k * 1000 (k < 5). A generated seed that fails is
  logged as {"failed": message} and skipped.
- held-out calibration studies:      seeds CALIBRATION_SEED_BASE + i,  i in [0, 100_000)  (the out-of-distribution
  check's threshold, training/ctclip_ood.py: unseen by training, by the check's fit and by the test split)
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

from engine.errors import UserError
from engine.labels import LABELS
from engine.phantom.render import PHANTOM_REVISION
from engine.settings import shared_data
from engine.transforms import to_model_tensor
from engine.volume import DEMO_SHAPE_ZYX, DEMO_SPACING_XYZ, Volume

TRAIN_SEED_BASE = 0
REAL_SEED_BASE = 500_000
CALIBRATION_SEED_BASE = 800_000
TEST_SEED_BASE = 900_000
LIBRARY_SEED_MIN = 1_000_000
REAL_RETRY_STRIDE = 1_000          # a real row whose phantom cannot be drawn retries seed + k * 1000 (k < 5)
REAL_RETRIES = 5
TEST_PLAN_SIZE = 320               # test seeds rendered; evaluation uses the first 300 that render
AIR_HU = -1000

# generated studies of each split: seeds [start, end)
SPLIT_SEED_RANGES = {"train": (TRAIN_SEED_BASE, REAL_SEED_BASE),
                     "calibration": (CALIBRATION_SEED_BASE, TEST_SEED_BASE),
                     "test": (TEST_SEED_BASE, LIBRARY_SEED_MIN)}


@dataclass
class CachePlan:
    """What a cache directory holds. Grid (z, y, x) voxels and spacing (x, y, z) mm are the phantom's render grid."""
    split: str                      # "train" | "calibration" | "test"
    n_generated: int
    n_real: int = 0                 # first n_real rows of the real-report CSV (train only)
    shape_zyx: tuple[int, int, int] = DEMO_SHAPE_ZYX
    spacing_xyz: tuple[float, float, float] = DEMO_SPACING_XYZ
    phantom_revision: int = PHANTOM_REVISION   # the phantom drawing the volumes (engine.phantom.PHANTOM_REVISION)

    def __post_init__(self):
        self.shape_zyx = tuple(int(v) for v in self.shape_zyx)
        self.spacing_xyz = tuple(float(v) for v in self.spacing_xyz)
        if self.split not in SPLIT_SEED_RANGES:
            raise ValueError(f"split must be one of {sorted(SPLIT_SEED_RANGES)}, not {self.split!r}")
        if self.split != "train" and self.n_real:
            raise ValueError("only the train split holds real-report studies (the real reports are training text)")
        seed_base, seed_end = SPLIT_SEED_RANGES[self.split]
        if seed_base + self.n_generated > seed_end:
            raise ValueError("too many generated studies for the split's seed range")

    @property
    def n_total(self) -> int:
        return self.n_generated + self.n_real

    def job(self, index: int) -> dict:
        """The seed, kind and (for real rows) CSV row of study `index`."""
        if index < self.n_generated:
            base = SPLIT_SEED_RANGES[self.split][0]
            return {"index": index, "seed": base + index, "kind": "generated", "row": None}
        row = index - self.n_generated
        return {"index": index, "seed": REAL_SEED_BASE + row, "kind": "real", "row": row}


def field_spacing_xyz(grid_zyx: tuple[int, int, int]) -> tuple[float, float, float]:
    """(x, y, z) mm spacing that spreads `grid_zyx` (z, y, x) voxels over the demo field of view (350 x 350 x 300 mm):
    DEMO_SPACING_XYZ on DEMO_SHAPE_ZYX, coarser on a smaller grid (cheap phantoms of the same anatomy)."""
    return tuple(s * n / g for s, n, g in zip(DEMO_SPACING_XYZ, DEMO_SHAPE_ZYX[::-1], tuple(grid_zyx)[::-1]))


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
        check_phantom_revision(root, old)
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


def held_out_cache(root: Path, preprocessing, n: int, plan_size: int = TEST_PLAN_SIZE) -> "PhantomCache":
    """The held-out test phantoms (seeds 900,000 + i) on the preprocessing's grid in `root` (e.g.
    cache/ctclip-demo/test), rendered there when fewer than n are cached: the first n that rendered. The one home of
    the test split that ctclip-eval, generate-eval and docs/map_headroom.py read."""
    root = Path(root)
    if not ((root / "meta.json").is_file() and len(PhantomCache(root)) >= n):
        build_cache(root, CachePlan("test", max(n, plan_size), 0, tuple(preprocessing.shape_zyx),
                                    tuple(preprocessing.spacing_xyz)))
    cache = PhantomCache(root)
    if len(cache) < n:
        raise RuntimeError(f"only {len(cache)} test studies rendered ({len(cache.failed)} seeds failed)")
    cache.records = cache.records[:n]
    return cache


def check_phantom_revision(root: Path, meta: dict) -> None:
    """Refuse a cache of another phantom drawing (meta.json without the field: revision 1, before it was recorded)."""
    revision = meta["plan"].get("phantom_revision", 1)
    if revision != PHANTOM_REVISION:
        raise UserError(f"{root} holds phantoms of revision {revision}, and the phantom now draws revision "
                         f"{PHANTOM_REVISION} (engine/phantom/render.py): delete the directory or use another one, "
                         "and the studies are rendered again")


class PhantomCache:
    """Read side of a finished (or partly finished) cache: records in index order and the volume memmap."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.meta = json.loads((self.root / "meta.json").read_text())
        check_phantom_revision(self.root, self.meta)
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

    def image(self, i: int, rng: np.random.Generator) -> torch.Tensor:
        """The model input of study i (augmented when `augment`)."""
        hu = self.cache.hu(i)
        if self.augment:
            hu = self.augment_hu(hu, rng)
        return hu_to_model(hu, self.cache.spacing_xyz, self.preset)

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.epoch, i])
        x = self.image(i, rng)
        kind = self._kind(i, rng)
        item = (x, self.cache.records[i][kind])
        if self.paired_text:
            item += (self.second_text(i, kind, rng),)
        if self.with_labels:
            item += (self.label_matrix[i],)
        return item



# ---- cached token features and focal-finding token masks (the token-feature vision family) ---------------------
#
# Next to volumes.npy, for a token-feature preset P ("demo" | "fast"):
# - token_features_P.npy: float32 (N, t, h, w, F), the model input of each cached volume by the engine's one path
#   (engine.transforms.prepare with the checkpoint's Preprocessing), computed once per study;
# - token_masks.npy: float32 (N, t, h, w, len(FOCAL_LABELS)), the share of each token's voxels inside each focal
#   finding's mask (engine.phantom.finding_masks), NaN where not computed (masks cost one render per finding);
# - token_features_P.jsonl: one line per finished study {"index", "masks"} (resumable, like studies.jsonl).

def features_paths(root: Path, preset: str) -> tuple[Path, Path, Path]:
    root = Path(root)
    return root / f"token_features_{preset}.npy", root / "token_masks.npy", root / f"token_features_{preset}.jsonl"


def token_shares(mask: np.ndarray, patch_zyx) -> np.ndarray:
    """Boolean (z, y, x) mask -> (t, h, w) share of each token's voxels inside it."""
    pz, py, px = patch_zyx
    z, y, x = mask.shape
    return mask.reshape(z // pz, pz, y // py, py, x // px, px).mean(axis=(1, 3, 5))


def _features_worker_init(root: str, preprocessing_dict: dict):
    from engine.transforms import Preprocessing
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    _WORKER["volumes"] = np.load(Path(root) / "volumes.npy", mmap_mode="r")
    _WORKER["spacing"] = tuple(json.loads((Path(root) / "meta.json").read_text())["plan"]["spacing_xyz"])
    _WORKER["preprocessing"] = Preprocessing.from_dict(preprocessing_dict)


def _features_job(job: tuple[dict, bool]) -> tuple[int, np.ndarray, np.ndarray | None]:
    """(record, with masks) -> (index, features (t, h, w, F), token mask shares (t, h, w, 8) or None)."""
    from engine.labels import FOCAL_LABELS
    from engine.phantom import finding_masks, study_findings
    record, with_masks = job
    pre = _WORKER["preprocessing"]
    hu = np.asarray(_WORKER["volumes"][record["index"]], dtype=np.float32)
    features = to_model_tensor(Volume(array=hu, spacing=_WORKER["spacing"]), pre).numpy()
    if not with_masks:
        return record["index"], features, None
    labels = record["labels"] if record["kind"] == "real" else None
    _, findings, _ = study_findings(record["seed"], labels)
    masks = finding_masks(record["seed"], findings, FOCAL_LABELS, tuple(pre.shape_zyx), tuple(pre.spacing_xyz))
    patch = (pre.shape_zyx[0] // features.shape[0], pre.shape_zyx[1] // features.shape[1],
             pre.shape_zyx[2] // features.shape[2])
    shares = np.zeros(features.shape[:3] + (len(FOCAL_LABELS),), np.float32)
    for k, label in enumerate(FOCAL_LABELS):
        if label in masks:
            shares[..., k] = token_shares(masks[label], patch)
    return record["index"], features, shares


def build_token_features(root: Path, preprocessing, n_masks: int | None = None, workers: int = 2,
                         progress: bool = True, n_studies: int | None = None) -> Path:
    """Compute the token features (and, for the first n_masks finished studies, None = all, the focal-finding token
    masks) of every finished study of the cache at `root` (the first n_studies, None = all) that lacks them;
    resumable. Returns `root`."""
    from engine.labels import FOCAL_LABELS
    preset = preprocessing.token_features
    if not preset:
        raise ValueError("build_token_features needs a token-feature preprocessing")
    root = Path(root)
    cache = PhantomCache(root)
    cache.records = cache.records[:n_studies]
    feat_path, mask_path, log_path = features_paths(root, preset)
    n_total = cache.volumes.shape[0]
    probe = to_model_tensor(Volume(array=cache.hu(0), spacing=cache.spacing_xyz), preprocessing).numpy()
    if not feat_path.exists():
        np.lib.format.open_memmap(feat_path, mode="w+", dtype=np.float32, shape=(n_total, *probe.shape))
    if not mask_path.exists():
        m = np.lib.format.open_memmap(mask_path, mode="w+", dtype=np.float32,
                                      shape=(n_total, *probe.shape[:3], len(FOCAL_LABELS)))
        m[:] = np.nan
        m.flush()
    features, masks = np.load(feat_path, mmap_mode="r+"), np.load(mask_path, mmap_mode="r+")
    done = _read_feature_log(log_path)
    n_masks = len(cache) if n_masks is None else n_masks
    todo = []
    for r, rec in enumerate(cache.records):
        want_masks = r < n_masks
        have = done.get(rec["index"])
        if have is None or (want_masks and not have):
            todo.append((rec, want_masks))
    bar = tqdm(total=len(cache), initial=len(cache) - len(todo), desc=f"token features ({root.name})", unit="study",
               disable=not progress)
    with open(log_path, "a") as log:
        def store(index, feats, shares):
            features[index] = feats
            if shares is not None:
                masks[index] = shares
            features.flush()
            masks.flush()
            log.write(json.dumps({"index": index, "masks": shares is not None}) + "\n")
            log.flush()
            bar.update(1)
        init_args = (str(root), preprocessing.to_dict())
        if workers <= 1:
            _features_worker_init(*init_args)
            for job in todo:
                store(*_features_job(job))
        else:
            with mp.get_context("spawn").Pool(workers, initializer=_features_worker_init, initargs=init_args) as pool:
                for out in pool.imap_unordered(_features_job, todo, chunksize=1):
                    store(*out)
    bar.close()
    return root


def _read_feature_log(path: Path) -> dict[int, bool]:
    """index -> whether its masks were computed (the last line of an index wins; a torn line is ignored)."""
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[rec["index"]] = out.get(rec["index"], False) or rec["masks"]
    return out


class TokenFeatureCache:
    """Read side of the cached token features (and masks) of a PhantomCache, by record position."""

    def __init__(self, cache: PhantomCache, preset: str):
        feat_path, mask_path, log_path = features_paths(cache.root, preset)
        self.cache = cache
        self.done = _read_feature_log(log_path)
        self.features = np.load(feat_path, mmap_mode="r") if feat_path.exists() else None
        self.masks = np.load(mask_path, mmap_mode="r") if mask_path.exists() else None

    def has(self, i: int) -> bool:
        return self.cache.records[i]["index"] in self.done

    def features_of(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.features[self.cache.records[i]["index"]]))

    def masks_of(self, i: int) -> torch.Tensor:
        """(t, h, w, len(FOCAL_LABELS)) token shares; NaN when not computed for this study."""
        return torch.from_numpy(np.array(self.masks[self.cache.records[i]["index"]]))

    def statistics(self) -> tuple[list[float], list[float]]:
        """Per-feature mean and SD over every token of the finished studies (the encoder's standardisation)."""
        rows = sorted(self.cache.records[i]["index"] for i in range(len(self.cache)) if self.has(i))
        flat = np.asarray(self.features[rows], dtype=np.float64).reshape(-1, self.features.shape[-1])
        return flat.mean(axis=0).tolist(), flat.std(axis=0).tolist()


def model_input(cache: PhantomCache, i: int, preprocessing, features: TokenFeatureCache | None = None):
    """The model input of the i-th cached study: its cached token features when there are some, else computed by
    the engine's one path (hu_to_model)."""
    if features is not None and features.has(i):
        return features.features_of(i)
    return hu_to_model(cache.hu(i), cache.spacing_xyz, preprocessing)


class TokenFeatureDataset(CTCLIPDataset):
    """CTCLIPDataset on cached token features: the same texts and labels; the image is the study's cached
    (t, h, w, F) features (no augmentation: they are computed once from the un-augmented volume); with
    with_token_masks the focal-finding token shares (t, h, w, 8) (NaN where not computed) come last."""

    def __init__(self, cache: PhantomCache, preset, seed: int = 0, paired_text: bool = False,
                 with_labels: bool = False, with_token_masks: bool = False):
        super().__init__(cache, preset, augment=False, seed=seed, paired_text=paired_text, with_labels=with_labels)
        self.features = TokenFeatureCache(cache, preset.token_features)
        cache.records = [r for i, r in enumerate(cache.records) if self.features.has(i)]   # finished studies only
        self.features = TokenFeatureCache(cache, preset.token_features)
        if with_labels:
            self.label_matrix = torch.from_numpy(cache.label_matrix()).float()
        self.with_token_masks = with_token_masks

    def image(self, i: int, rng: np.random.Generator) -> torch.Tensor:
        return self.features.features_of(i)

    def __getitem__(self, i: int):
        item = super().__getitem__(i)
        return item + (self.features.masks_of(i),) if self.with_token_masks else item
