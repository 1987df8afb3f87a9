"""X2CT-CLIP's training data: per study, a few DRRs (engine/drr.py) and the FROZEN CT CLIP's CT and report latents,
computed once and cached, so a training step only runs the CXR encoder.

A split's cache directory (cache/x2ct-PRESET/SPLIT/):
    meta.json                       the plan (source, seeds or CT-RATE names, views, image size, DRR view)
    studies.json                    one record per study: {"key", "labels": [18 x 0/1], "report"}
    drrs.npy                        float16 (N, V, S, S): the encoder's input (engine.models.cxr_encoder.
                                    prepare_radiograph); view 0 is the clean DRR, views 1.. are augmented
    latents-<ctclip model id>.npz   "ct" (N, D) and "report" (N, D) unit latents of THAT CT CLIP: a retrained CT CLIP
                                    (another model id) recomputes the latents and reuses the DRRs
Sources
- demo: phantoms (engine.phantom.make_study) with their CT-RATE-style reports. Seeds: training X2CT_TRAIN_SEED_BASE
  + i (600,000 up: a range no other trainer uses and the CT CLIP never saw); test: the CT CLIP's own held-out test
  seeds (training.ctclip_data.TEST_SEED_BASE + i), so the CXR encoder and the CT encoder are scored on the same
  unseen studies.
- paper: every CT-RATE volume of training.ctrate.CTRATEDataset (its Findings text and label table); DRRs in the
  paper's anteroposterior view.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.drr import DRR_RECIPE, DRRAugmentation, simulate_radiograph
from engine.labels import LABELS
from engine.models.cxr_encoder import prepare_radiograph
from engine.phantom.render import PHANTOM_REVISION

X2CT_TRAIN_SEED_BASE = 600_000
FLUSH_EVERY_S = 600.0      # a cache build writes what it has made this often (seconds), so it resumes


@dataclass
class DRRPlan:
    """What a split's cache holds. n_views: DRRs per study (the first clean, the others augmented);
    image_size: the encoder's input side (pixels); view: "pa" | "ap"."""
    source: str = "phantom"          # "phantom" | "ctrate"
    split: str = "train"
    n_studies: int = 400
    n_views: int = 4
    image_size: int = 128
    view: str = "ap"
    seed_base: int = X2CT_TRAIN_SEED_BASE
    recipe: str = DRR_RECIPE         # engine.drr's physics and display: DRRs of another recipe are rebuilt
    phantom_revision: int | None = None   # the phantom drawn (engine.phantom.PHANTOM_REVISION; None for CT-RATE):
                                          # a cache of another revision is rebuilt

    def __post_init__(self):
        if self.source == "phantom" and self.phantom_revision is None:
            self.phantom_revision = PHANTOM_REVISION


def phantom_seed_base(split: str) -> int:
    from training.ctclip_data import TEST_SEED_BASE

    return X2CT_TRAIN_SEED_BASE if split == "train" else TEST_SEED_BASE


def drr_views(volume, plan: DRRPlan, key_seed: int) -> np.ndarray:
    """(V, S, S) float16 encoder inputs of one CT: the clean DRR, then V - 1 seeded augmentations."""
    views = []
    for v in range(plan.n_views):
        augmentation = None if v == 0 else DRRAugmentation.sample(np.random.default_rng([key_seed, v]))
        radiograph = simulate_radiograph(volume, view=plan.view, augmentation=augmentation, seed=key_seed * 31 + v)
        views.append(prepare_radiograph(radiograph, plan.image_size)[0].numpy())
    return np.stack(views).astype(np.float16)


_WORKER: dict = {}          # a rendering worker's frozen CT CLIP (None: the main process encodes)


def _phantom_worker_init(ctclip_dir: str | None, model_id: str | None) -> None:
    """A rendering worker that also encodes its volumes with the frozen CT CLIP of `ctclip_dir` (one thread each):
    encoding is most of a study's cost (about 1.5 s of 2.3 s for the demo token-feature encoder), so with it in the
    workers both cores render and encode instead of the main process encoding every volume alone."""
    torch.set_num_threads(1)
    _WORKER["pipeline"] = None
    if ctclip_dir:
        from engine.pipelines.ctclip import CTClipPipeline

        pipeline = CTClipPipeline.from_pretrained(ctclip_dir)
        if pipeline.model_id == model_id:          # the same weights as the caller's, or the caller encodes
            _WORKER["pipeline"] = pipeline


def _phantom_study(job: tuple[dict, int]):
    """Worker: render phantom `seed` and its DRRs -> (record, views, volume, CT latent or None). The latent comes
    from the worker's own CT CLIP when it has one (the volume is then not sent back); else the caller encodes."""
    from engine.phantom import make_study

    plan_dict, seed = job
    plan = DRRPlan(**plan_dict)
    study = make_study(seed)
    labels = [int(name in study.labels) for name in LABELS]
    record = {"key": f"phantom-{seed}", "seed": seed, "labels": labels, "report": study.report.text}
    pipeline = _WORKER.get("pipeline")
    if pipeline is not None:
        return record, drr_views(study.volume, plan, seed), None, pipeline.embed_volume(study.volume)
    return record, drr_views(study.volume, plan, seed), study.volume, None


def _ctrate_items(dataset, plan: DRRPlan, start: int = 0):
    from training.ctrate import load_volume, volume_path

    for i, name in enumerate(dataset.names[start: plan.n_studies], start=start):
        volume = load_volume(volume_path(dataset.root, name), dataset.metadata.loc[name])
        record = {"key": name, "labels": [int(v) for v in dataset.label_vector(i)], "report": dataset.text(i)}
        yield record, drr_views(volume, plan, i), volume, None


def build_split(root: Path, plan: DRRPlan, pipeline, workers: int = 1, ctrate=None) -> Path:
    """Write (or complete) the cache of one split; returns its directory. pipeline: the frozen CTClipPipeline whose
    latents are cached (in eval mode; no gradients). ctrate: a CTRATEDataset for the paper source. A cache of the
    same plan with fewer studies is extended (studies 0..n-1 are the same whatever n is), not rebuilt."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    latents = root / f"latents-{pipeline.model_id}.npz"
    start = _studies_to_keep(root, plan, pipeline.model_id)
    if start < plan.n_studies:
        latents.unlink(missing_ok=True)                 # the report latents cover every study: remade below
        _build_drrs(root, plan, pipeline, workers, ctrate, start)
    if not latents.is_file():
        _build_latents(root, plan, pipeline, ctrate)
    return root


def _studies_to_keep(root: Path, plan: DRRPlan, model_id: str) -> int:
    """How many studies of the cache in `root` the plan can keep: all of them when the plan is the cache's; the
    cache's n when only n_studies grew and the CT latents of this CT CLIP were kept; otherwise 0 (rebuild)."""
    if not ((root / "meta.json").is_file() and (root / "drrs.npy").is_file()):
        return 0
    cached = json.loads((root / "meta.json").read_text())["plan"]
    if cached == asdict(plan):
        return plan.n_studies
    if {**cached, "n_studies": plan.n_studies} == asdict(plan) and cached["n_studies"] < plan.n_studies \
            and (root / f"ct-latents-{model_id}.npy").is_file():
        return int(cached["n_studies"])
    return 0


def _build_drrs(root: Path, plan: DRRPlan, pipeline, workers: int, ctrate, start: int = 0,
                flush_every_s: float = FLUSH_EVERY_S) -> None:
    """Render studies start..n-1 (phantom workers or CT-RATE reads), keep their DRRs and, while the volume is at
    hand, their CT latents (written with the report latents by _build_latents); append them to the first `start`.
    Every `flush_every_s` seconds what is made so far is written as a cache of that many studies, so an interrupted
    build (a session's end, Ctrl-C) resumes from there: the next build_split extends it."""
    records, views, ct_latents = [], [], []
    if start:
        records = json.loads((root / "studies.json").read_text())[:start]
        views = list(np.load(root / "drrs.npy")[:start])
        ct_latents = list(np.load(root / f"ct-latents-{pipeline.model_id}.npy")[:start])
    if plan.source == "phantom":
        jobs = [(asdict(plan), plan.seed_base + i) for i in range(start, plan.n_studies)]
        directory = getattr(pipeline, "directory", None)
        pool = mp.get_context("spawn").Pool(workers, initializer=_phantom_worker_init,
                                            initargs=(str(directory) if directory else None,
                                                      pipeline.model_id)) if workers > 1 else None
        items = pool.imap(_phantom_study, jobs) if pool else map(_phantom_study, jobs)
    else:
        pool, items = None, _ctrate_items(ctrate, plan, start)
    flushed = time.monotonic()
    try:
        for record, drrs, volume, latent in tqdm(items, total=plan.n_studies, initial=start,
                                                 desc=f"DRRs ({plan.split})", unit="study"):
            records.append(record)
            views.append(drrs)
            ct_latents.append(latent if latent is not None else pipeline.embed_volume(volume))
            if time.monotonic() - flushed > flush_every_s and len(records) < plan.n_studies:
                _write_studies(root, plan, records, views, ct_latents, pipeline.model_id)
                flushed = time.monotonic()
    finally:
        if pool:
            pool.close()
    _write_studies(root, plan, records, views, ct_latents, pipeline.model_id)


def _write_studies(root: Path, plan: DRRPlan, records: list, views: list, ct_latents: list, model_id: str) -> None:
    """The cache of the first len(records) studies of `plan`. Each file is replaced whole (written aside, then
    renamed) and meta.json goes last, so a kill at any point leaves a cache that _studies_to_keep reads consistently
    (every file holds at least the studies meta.json counts)."""
    def replace(name: str, write) -> None:
        partial = root / f"{name}.partial"
        with open(partial, "wb") as out:
            write(out)
        partial.replace(root / name)

    replace("drrs.npy", lambda f: np.save(f, np.stack(views)))
    replace("studies.json", lambda f: f.write(json.dumps(records).encode()))
    replace(f"ct-latents-{model_id}.npy", lambda f: np.save(f, np.stack(ct_latents).astype(np.float32)))
    replace("meta.json", lambda f: f.write(json.dumps({"plan": {**asdict(plan), "n_studies": len(records)}},
                                                      indent=1).encode()))


def _build_latents(root: Path, plan: DRRPlan, pipeline, ctrate) -> None:
    records = json.loads((root / "studies.json").read_text())
    ct_path = root / f"ct-latents-{pipeline.model_id}.npy"
    if ct_path.is_file():
        ct = np.load(ct_path)
    elif plan.source == "phantom":          # another CT CLIP than the DRRs were made with: re-render the volumes
        from engine.phantom import make_study

        ct = np.stack([pipeline.embed_volume(make_study(r["seed"], with_report=False).volume)
                       for r in tqdm(records, desc="CT latents", unit="study")])
    else:
        ct = np.stack([pipeline.embed_volume(volume) for _, _, volume, _ in _ctrate_items(ctrate, plan)])
    texts = [r["report"] for r in records]      # chunks of 256 (a multiple of embed_texts' batch): the same batches
    report = np.concatenate([pipeline.embed_texts(texts[i:i + 256])
                             for i in tqdm(range(0, len(texts), 256), desc="report latents", unit="x256 reports")])
    np.savez(root / f"latents-{pipeline.model_id}.npz", ct=ct.astype(np.float32), report=report.astype(np.float32))


class X2CTCache:
    """Read side of a split: DRRs (memory-mapped), latents of one CT CLIP, labels, reports."""

    def __init__(self, root: Path, model_id: str):
        self.root = Path(root)
        self.records = json.loads((self.root / "studies.json").read_text())
        self.drrs = np.load(self.root / "drrs.npy", mmap_mode="r")
        latents = np.load(self.root / f"latents-{model_id}.npz")
        self.ct_latents = torch.from_numpy(latents["ct"])
        self.report_latents = torch.from_numpy(latents["report"])
        self.labels = np.array([r["labels"] for r in self.records], dtype=np.int64)

    def __len__(self):
        return len(self.records)

    def image(self, i: int, view: int = 0) -> torch.Tensor:
        """(1, S, S) float32 encoder input of study i's DRR number `view`."""
        return torch.from_numpy(np.asarray(self.drrs[i, view], dtype=np.float32))[None]


class X2CTDataset(torch.utils.data.Dataset):
    """(DRR (1, S, S), CT latent (D,), report latent (D,), labels (L,) float 0/1 in engine.labels order); the DRR is
    one of the study's cached views, drawn from rng([seed, epoch, i]) when `augment`, else the clean view 0."""

    def __init__(self, cache: X2CTCache, augment: bool = True, seed: int = 0):
        self.cache, self.augment, self.seed, self.epoch = cache, augment, seed, 0

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, i: int):
        view = 0
        if self.augment:
            view = int(np.random.default_rng([self.seed, self.epoch, i]).integers(self.cache.drrs.shape[1]))
        return (self.cache.image(i, view), self.cache.ct_latents[i], self.cache.report_latents[i],
                torch.from_numpy(self.cache.labels[i].astype(np.float32)))
