"""X2CT-CLIP end to end on tiny data: the DRR + latent cache, two training steps through training/loop.py, the
evaluation's metrics.json, and `engine findings` on the real radiographs (a checkpoint folder from the run)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.drr import simulate_radiograph
from engine.models.cxr_encoder import prepare_radiograph
from engine.phantom import make_study

ROOT = Path(__file__).resolve().parents[1]
CXR_DIR = ROOT.parent / "shared" / "data" / "cxr"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from training.train_x2ct import X2CTTrainConfig, train

    out = tmp_path_factory.mktemp("x2ct")
    cfg = X2CTTrainConfig(steps=2, batch_size=2, n_train=4, n_test=3, n_views=2, cache_workers=1, warmup_steps=0,
                          log_every=1)
    summary = train(cfg, out / "run", cache_root=out / "cache", progress=False)
    return out, summary


def test_training_writes_a_model_and_caches_drrs_and_latents(run):
    out, summary = run
    assert summary["steps"] == 2 and (out / "run" / "model" / "model.safetensors").is_file()
    log = [json.loads(line) for line in (out / "run" / "train_log.jsonl").read_text().splitlines()]
    assert {"loss_cxr_report", "loss_cxr_ct", "loss_ct_report"} <= set(log[-1])
    last = log[-1]                                               # alpha 0, beta = gamma = 1
    assert abs(last["loss"] - last["loss_cxr_report"] - last["loss_cxr_ct"]) < 1e-4
    drrs = np.load(out / "cache" / "train" / "drrs.npy")
    assert drrs.shape == (4, 2, 128, 128) and drrs.dtype == np.float16
    records = json.loads((out / "cache" / "train" / "studies.json").read_text())
    first = make_study(records[0]["seed"])                       # view 0 is the clean DRR through the one input path
    clean = prepare_radiograph(simulate_radiograph(first.volume, view="ap"), 128)[0].numpy()
    assert np.abs(drrs[0, 0].astype(np.float32) - clean).max() < 0.02
    assert not np.array_equal(drrs[0, 0], drrs[0, 1])            # view 1 is augmented
    latents = np.load(next((out / "cache" / "train").glob("latents-*.npz")))
    assert latents["ct"].shape == latents["report"].shape == (4, 256)
    assert np.allclose(np.linalg.norm(latents["ct"], axis=1), 1.0, atol=1e-4)


def test_evaluation_writes_metrics_json(run):
    from training.eval_x2ct import evaluate

    out, _ = run
    metrics = evaluate(out / "run" / "model", cache_root=out / "cache")
    written = json.loads((out / "run" / "model" / "metrics.json").read_text())
    assert written["n"] == 3 and written["loss_weights"] == {"alpha": 0.0, "beta": 1.0, "gamma": 1.0, "tau": 0.07}
    assert set(written["few_shot_linear_probe"]) == {"20%", "50%"}
    assert 0.0 <= metrics["cxr_to_volume"]["R@3"] <= 1.0 and written["cxr_to_volume"]["R@3"] == 1.0   # K = gallery
    assert set(written["zero_shot"]["per_label"]) == set(written["ctclip_zero_shot"]["per_label"])


def test_findings_on_real_radiographs_and_a_drr(run, tmp_path):
    from engine.pipelines.ctclip import CTClipPipeline
    from engine.pipelines.cxr import CXRPipeline
    from engine.radiograph import read_radiograph

    out, _ = run
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CT_WORKSTATION_LIBRARY": str(tmp_path / "lib")}
    done = subprocess.run([sys.executable, "-m", "engine", "findings", "--cxr", str(CXR_DIR / "00000001_000.png"),
                           "--k", "3", "--cxr-weights", str(out / "run" / "model"), "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    answer = json.loads(done.stdout)
    assert len(answer["findings"]) == 18 and all(0.0 <= p <= 1.0 for p in answer["findings"].values())
    assert len(answer["similar"]) == 3 and answer["similar"][0]["score"] >= answer["similar"][-1]["score"]
    metrics = out / "run" / "model" / "metrics.json"   # the encoder's own figures (written by the evaluation test)
    per_label = json.loads(metrics.read_text())["zero_shot"]["per_label"] if metrics.is_file() else {}
    assert answer["held_out_auroc"] == {k: v["auroc"] for k, v in per_label.items() if v.get("auroc") is not None}
    pipeline = CXRPipeline.from_pretrained(out / "run" / "model", ctclip=CTClipPipeline.from_pretrained())
    films = [read_radiograph(CXR_DIR / "siim_pa_chest.dcm"), simulate_radiograph(make_study(7).volume)]
    for film in films:
        findings = pipeline.findings(film)
        assert list(findings) == list(answer["findings"]) and all(0.0 <= p <= 1.0 for p in findings.values())


def test_findings_without_a_model_says_how_to_train_it(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CT_X2CT_DIR": str(tmp_path / "none")}
    done = subprocess.run([sys.executable, "-m", "engine", "findings", "--cxr", str(CXR_DIR / "00000001_000.png"),
                           "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "python -m training x2ct" in json.loads(done.stdout)["error"]


def test_location_map_lies_on_the_radiograph(run):
    from engine.pipelines.ctclip import CTClipPipeline
    from engine.pipelines.cxr import CXRPipeline
    from engine.radiograph import read_radiograph

    out, _ = run
    pipeline = CXRPipeline.from_pretrained(out / "run" / "model", ctclip=CTClipPipeline.from_pretrained())
    film = read_radiograph(CXR_DIR / "00000001_000.png")
    heat, score = pipeline.location_map(film, "Cardiomegaly")
    assert heat.shape == film.image.shape and 0.0 <= heat.min() and heat.max() <= 1.0 + 1e-6
    assert np.isfinite(score)


def test_a_larger_plan_extends_the_cache_and_equals_a_fresh_build(run, tmp_path):
    """n_train 4 -> 6 renders only studies 4 and 5: the first four are kept byte for byte, the report latents are
    remade for all six, and the result equals a cache built at 6 from nothing."""
    from dataclasses import replace

    from training.train_x2ct import load_ctclip, X2CTTrainConfig
    from training.x2ct_data import DRRPlan, build_split

    out, _ = run
    pipeline = load_ctclip(X2CTTrainConfig())
    small = out / "cache" / "train"
    before = np.load(small / "drrs.npy")
    plan = replace(DRRPlan(**json.loads((small / "meta.json").read_text())["plan"]), n_studies=6)
    extended = build_split(tmp_path / "extended", DRRPlan(**{**plan.__dict__, "n_studies": 4}), pipeline)
    first_four = np.load(extended / "drrs.npy").copy()
    build_split(extended, plan, pipeline)
    fresh = build_split(tmp_path / "fresh", plan, pipeline)
    grown = np.load(extended / "drrs.npy")
    assert grown.shape[0] == 6 and np.array_equal(grown[:4], first_four) and np.array_equal(first_four, before)
    assert np.array_equal(grown, np.load(fresh / "drrs.npy"))
    for name in ("ct", "report"):
        grown_latents = np.load(next(extended.glob("latents-*.npz")))[name]
        assert grown_latents.shape[0] == 6
        assert np.allclose(grown_latents, np.load(next(fresh.glob("latents-*.npz")))[name], atol=1e-5)
    assert json.loads((extended / "studies.json").read_text()) == json.loads((fresh / "studies.json").read_text())


def test_drrs_of_another_phantom_revision_are_rebuilt(run, tmp_path):
    """The DRR cache records the phantom revision that drew it: the same cache with revision 1 in its plan (or none,
    as before the revision was kept) keeps no study, so build_split renders every one again."""
    from engine.phantom import PHANTOM_REVISION
    from training.train_x2ct import load_ctclip, X2CTTrainConfig
    from training.x2ct_data import DRRPlan, _studies_to_keep

    out, _ = run
    model_id = load_ctclip(X2CTTrainConfig()).model_id
    cached = out / "cache" / "train"
    meta = json.loads((cached / "meta.json").read_text())
    plan = DRRPlan(**meta["plan"])
    assert plan.phantom_revision == PHANTOM_REVISION and DRRPlan(source="ctrate").phantom_revision is None
    assert _studies_to_keep(cached, plan, model_id) == plan.n_studies
    old = tmp_path / "old"
    old.mkdir()
    for name in ("drrs.npy", "studies.json"):
        (old / name).write_bytes((cached / name).read_bytes())
    for stale in ({**meta["plan"], "phantom_revision": 1}, {k: v for k, v in meta["plan"].items()
                                                              if k != "phantom_revision"}):
        (old / "meta.json").write_text(json.dumps({"plan": stale}))
        assert _studies_to_keep(old, plan, model_id) == 0


def test_two_rendering_workers_encode_as_the_main_process_does(run, tmp_path):
    """With 2 workers each worker renders, makes the DRRs AND encodes with its own copy of the frozen CT CLIP (the
    encoding is most of a study's cost); the cache equals the one the main process encodes alone (workers=1)."""
    from training.train_x2ct import load_ctclip, X2CTTrainConfig
    from training.x2ct_data import DRRPlan, build_split

    pipeline = load_ctclip(X2CTTrainConfig())
    plan = DRRPlan(split="train", n_studies=3, n_views=1, seed_base=600_000)
    alone = build_split(tmp_path / "alone", plan, pipeline, workers=1)
    pooled = build_split(tmp_path / "pooled", plan, pipeline, workers=2)
    assert np.array_equal(np.load(alone / "drrs.npy"), np.load(pooled / "drrs.npy"))
    for name in ("ct", "report"):
        a = np.load(next(alone.glob("latents-*.npz")))[name]
        assert a.shape[0] == 3 and np.allclose(a, np.load(next(pooled.glob("latents-*.npz")))[name], atol=1e-5)


class _StopsAfter:
    """The frozen CT CLIP, interrupted (as Ctrl-C or a session's end would) at its `n`-th volume."""

    def __init__(self, pipeline, n: int):
        self.pipeline, self.n, self.model_id = pipeline, n, pipeline.model_id

    def embed_volume(self, volume):
        self.n -= 1
        if self.n < 0:
            raise KeyboardInterrupt
        return self.pipeline.embed_volume(volume)

    def embed_texts(self, texts):
        return self.pipeline.embed_texts(texts)


def test_an_interrupted_build_resumes_where_its_last_flush_left_off(run, tmp_path):
    """Flushing after every study, a build of 4 stopped while embedding the 3rd keeps 2 studies (a cache of
    n_studies 2 whose files agree); the next build_split renders only studies 2 and 3 and equals the fresh build."""
    from training.train_x2ct import load_ctclip, X2CTTrainConfig
    from training.x2ct_data import DRRPlan, _build_drrs, build_split

    out, _ = run
    pipeline = load_ctclip(X2CTTrainConfig())
    plan = DRRPlan(**json.loads((out / "cache" / "train" / "meta.json").read_text())["plan"])
    assert plan.n_studies == 4
    root = tmp_path / "interrupted"
    root.mkdir()
    with pytest.raises(KeyboardInterrupt):
        _build_drrs(root, plan, _StopsAfter(pipeline, 2), workers=1, ctrate=None, flush_every_s=0.0)
    assert json.loads((root / "meta.json").read_text())["plan"]["n_studies"] == 2
    assert np.load(root / "drrs.npy").shape[0] == 2 and len(json.loads((root / "studies.json").read_text())) == 2
    assert not list(root.glob("*.partial"))
    resumed = _StopsAfter(pipeline, 2)        # a resume that rendered study 0 or 1 again would be interrupted
    build_split(root, plan, resumed)
    assert resumed.n == 0
    assert np.array_equal(np.load(root / "drrs.npy"), np.load(out / "cache" / "train" / "drrs.npy"))
    assert json.loads((root / "studies.json").read_text()) == \
        json.loads((out / "cache" / "train" / "studies.json").read_text())
    for name in ("ct", "report"):
        assert np.allclose(np.load(next(root.glob("latents-*.npz")))[name],
                           np.load(next((out / "cache" / "train").glob("latents-*.npz")))[name], atol=1e-5)
