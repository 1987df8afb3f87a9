"""CT CLIP training: the phantom cache (build, resume), the dataset, the text-prefix cache, DDP on 2 CPU processes."""
from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as tmp_mp

from engine.labels import LABELS
from training.ctclip_data import (LIBRARY_SEED_MIN, REAL_SEED_BASE, TEST_SEED_BASE, CachePlan, CTCLIPDataset,
                                  PhantomCache, build_cache, load_real_reports)
from engine.models.text import FrozenTextPrefix
from tests.tiny_models import TINY_SHAPE, TINY_SPACING, tiny_ctclip_overrides as tiny_overrides
from training.train_ctclip import ContrastiveStep, StepSampler, TrainConfig, build_model, train


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("cache") / "train"
    build_cache(root, CachePlan("train", n_generated=4, n_real=2, shape_zyx=TINY_SHAPE, spacing_xyz=TINY_SPACING),
                workers=1, real_csv=shared_data / "ctrate_reports" / "reports_with_labels.csv", progress=False)
    return root


def test_cache_records_seeds_and_real_reports(tiny_cache, shared_data):
    cache = PhantomCache(tiny_cache)
    assert len(cache) == 6
    seeds = [r["seed"] for r in cache.records]
    assert seeds == [0, 1, 2, 3, REAL_SEED_BASE, REAL_SEED_BASE + 1]
    assert max(seeds) < TEST_SEED_BASE < LIBRARY_SEED_MIN
    real = load_real_reports(shared_data / "ctrate_reports" / "reports_with_labels.csv")
    for row in (0, 1):
        rec = cache.records[4 + row]
        assert rec["kind"] == "real" and rec["real_report"] == real.text[row]
        assert rec["labels"] == real.labels[row]                      # rendered from ITS label set
    for rec in cache.records:
        assert rec["report"].startswith("Findings:") and "Impression:" in rec["report"] and rec["query"]
        assert all(n in LABELS for n in rec["labels"])
    hu = cache.hu(0)
    assert hu.shape == TINY_SHAPE and hu.min() < -900 and hu.max() > 200     # air and bone are there


def test_cache_resumes_after_interruption(tiny_cache, tmp_path, shared_data):
    """Cut the log after 3 studies (as a kill would), rebuild: same records, same volumes, nothing rendered twice."""
    root = tmp_path / "train"
    root.mkdir()
    for name in ("meta.json", "volumes.npy"):
        (root / name).write_bytes((tiny_cache / name).read_bytes())
    lines = (tiny_cache / "studies.jsonl").read_text().splitlines()
    (root / "studies.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])     # torn last line
    volumes = np.load(root / "volumes.npy", mmap_mode="r+")
    volumes[3:] = 0
    volumes.flush()
    del volumes
    build_cache(root, CachePlan("train", 4, 2, TINY_SHAPE, TINY_SPACING), workers=1,
                real_csv=shared_data / "ctrate_reports" / "reports_with_labels.csv", progress=False)
    a, b = PhantomCache(tiny_cache), PhantomCache(root)
    assert [r["seed"] for r in a.records] == [r["seed"] for r in b.records]
    assert [r["report"] for r in a.records] == [r["report"] for r in b.records]
    np.testing.assert_array_equal(np.asarray(a.volumes), np.asarray(b.volumes))
    with pytest.raises(ValueError):           # another plan in the same directory is refused
        build_cache(root, CachePlan("train", 5, 2, TINY_SHAPE, TINY_SPACING), workers=1, progress=False)


def test_cache_of_another_phantom_revision_is_refused(tiny_cache, tmp_path):
    """A cache records the phantom revision that drew it; readers and a resume refuse another one (the same seed now
    draws another picture), with one sentence. A meta.json without the field is revision 1, before it was kept."""
    from engine.errors import UserError
    from engine.phantom import PHANTOM_REVISION

    root = tmp_path / "train"
    root.mkdir()
    for name in ("volumes.npy", "studies.jsonl"):
        (root / name).write_bytes((tiny_cache / name).read_bytes())
    meta = json.loads((tiny_cache / "meta.json").read_text())
    assert meta["plan"]["phantom_revision"] == PHANTOM_REVISION
    del meta["plan"]["phantom_revision"]
    (root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="revision 1, and the phantom now draws revision"):
        PhantomCache(root)
    with pytest.raises(UserError, match="delete the directory"):
        build_cache(root, CachePlan("train", 4, 2, TINY_SHAPE, TINY_SPACING), workers=1, progress=False)


def test_test_split_seeds_are_disjoint():
    train, test = CachePlan("train", 300_000), CachePlan("test", 300)
    assert train.job(299_999)["seed"] < REAL_SEED_BASE
    assert test.job(0)["seed"] == TEST_SEED_BASE and test.job(299)["seed"] < LIBRARY_SEED_MIN
    with pytest.raises(ValueError):
        CachePlan("train", REAL_SEED_BASE + 1)


def test_dataset_texts_and_augmentation_keep_sides(tiny_cache):
    from engine.transforms import Preprocessing
    cache = PhantomCache(tiny_cache)
    preset = Preprocessing("tiny", TINY_SPACING, TINY_SHAPE)
    ds = CTCLIPDataset(cache, preset, augment=True, seed=0)
    kinds = {"report": 0, "query": 0, "real_report": 0}
    for epoch in range(12):
        ds.epoch = epoch
        for i in range(len(ds)):
            x, text = ds[i]
            rec = cache.records[i]
            kind = next(k for k in kinds if rec.get(k) == text)
            kinds[kind] += 1
            assert kind != "real_report" or rec["kind"] == "real"
    assert all(v > 0 for v in kinds.values())
    ds.epoch = 0
    x0, t0 = ds[0]
    x1, t1 = ds[0]
    assert torch.equal(x0, x1) and t0 == t1                            # deterministic given (seed, epoch, i)
    assert x0.shape == (1, *TINY_SHAPE) and -1.0 <= float(x0.min()) and float(x0.max()) <= 1.0
    clean = CTCLIPDataset(cache, preset, augment=False)[0][0][0].numpy()
    aug = x0[0].numpy()
    assert not np.allclose(clean, aug)

    def best_match(a, b):     # highest correlation of b with a over the allowed integer shifts (z +-2, y/x +-4)
        return max(np.corrcoef(np.roll(a, (dz, dy, dx), (0, 1, 2))[2:-2, 4:-4, 4:-4].ravel(),
                               b[2:-2, 4:-4, 4:-4].ravel())[0, 1]
                   for dz in range(-2, 3) for dy in range(-4, 5) for dx in range(-4, 5))
    same, mirrored = best_match(clean, aug), best_match(clean[:, :, ::-1], aug)
    assert same > 0.9 and same > mirrored + 0.05                       # shifted and noisy, never mirrored


def test_paired_text_is_another_description_of_the_same_study(tiny_cache):
    from engine.transforms import Preprocessing
    cache = PhantomCache(tiny_cache)
    ds = CTCLIPDataset(cache, Preprocessing("tiny", TINY_SPACING, TINY_SHAPE), augment=False, paired_text=True)
    for i in range(len(ds)):
        _, text, text2 = ds[i]
        rec = cache.records[i]
        texts = {rec["report"], rec["query"], rec.get("real_report")}
        assert text in texts and text2 in texts and text != text2
        assert rec["query"] in (text, text2)                       # a report is always paired with its query


def test_centred_heads_spread_the_initial_latents(tiny_cache):
    from training.train_ctclip import center_latent_heads
    model = build_model(TrainConfig(preset="demo", text_max_length=64, model_overrides=tiny_overrides()))
    ds = CTCLIPDataset(PhantomCache(tiny_cache), model.preprocessing, augment=False)
    stats = center_latent_heads(model, ds, FrozenTextPrefix(model, 4, 64), n=6)
    assert stats["text_cos_after"] < stats["text_cos_before"] - 0.2
    assert stats["image_cos_after"] < stats["image_cos_before"]


def test_step_sampler_deterministic_and_sharded():
    a = StepSampler(10, 2, world=2, rank=0, seed=3, start=0, stop=6)
    b = StepSampler(10, 2, world=2, rank=1, seed=3, start=0, stop=6)
    for step in range(6):
        ia, ib = a.batch(step), b.batch(step)
        assert len(ia) == len(ib) == 2 and not set(ia) & set(ib)
    resumed = StepSampler(10, 2, world=2, rank=0, seed=3, start=4, stop=6)
    assert list(resumed) == list(a)[4:]


def test_frozen_text_prefix_is_exact():
    model = build_model(TrainConfig(preset="demo", text_max_length=64, model_overrides=tiny_overrides())).eval()
    prefix = FrozenTextPrefix(model, n_frozen=4, max_length=64)
    texts = ["Right pleural effusion.", "Findings: Mild centrilobular emphysema in both upper lobes. Impression: ok"]
    with torch.no_grad():
        tok = model.tokenize(texts)
        want = model.encode_text(tok["input_ids"], tok["attention_mask"])
        h, mask = prefix.hidden(texts)
        got = ContrastiveStep(model, prefix).encode_text_from_hidden(h, mask)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)          # the fp16 cache rounds a little
    assert set(prefix.store) == set(texts)
    assert not any(p.requires_grad for p in model.text_transformer.embeddings.parameters())


def test_cls_only_top_layer_is_exact():
    """Training computes the top BERT layer for [CLS] alone; the latent must equal the full tower's."""
    model = build_model(TrainConfig(preset="demo", text_max_length=64, model_overrides=tiny_overrides())).eval()
    prefix = FrozenTextPrefix(model, n_frozen=4, max_length=64, cache=False)
    texts = ["Right pleural effusion.", "Findings: Mild centrilobular emphysema in both upper lobes. Impression: ok",
             "No pleural effusion was observed in either hemithorax."]
    with torch.no_grad():
        h, mask = prefix.hidden(texts)                                 # padded: the mask must be honoured
        full = ContrastiveStep(model, prefix).encode_text_from_hidden(h, mask)
        fast = ContrastiveStep(model, prefix, cls_only_top_layer=True).encode_text_from_hidden(h, mask)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)


def test_label_head_adds_a_supervised_term_that_reaches_both_towers(tiny_cache):
    model = build_model(TrainConfig(preset="demo", text_max_length=64, model_overrides=tiny_overrides()))
    ds = CTCLIPDataset(PhantomCache(tiny_cache), model.preprocessing, augment=False,
                       paired_text=True, with_labels=True)
    from training.train_ctclip import collate
    volumes, texts, texts2, labels = collate([ds[i] for i in range(4)])
    assert labels.shape == (4, len(LABELS)) and set(labels.unique().tolist()) <= {0.0, 1.0}
    assert labels.sum(1).tolist() == [float(len(ds.cache.records[i]["labels"])) for i in range(4)]
    prefix = FrozenTextPrefix(model, n_frozen=5, max_length=64)
    step = ContrastiveStep(model, prefix, cls_only_top_layer=True, n_labels=len(LABELS))
    (a, b), (a2, b2) = prefix.hidden(texts), prefix.hidden(texts2)
    plain, _ = step(volumes, a, b, a2, b2, text_text_weight=1.0)
    supervised, _ = step(volumes, a, b, a2, b2, text_text_weight=1.0, labels=labels, label_loss_weight=1.0)
    assert supervised.item() > plain.item() + 0.1                      # BCE of an untrained head is about ln 2
    supervised.backward()
    assert step.label_head.weight.grad.abs().sum() > 0
    assert model.visual_transformer.to_patch_emb[2].weight.grad.abs().sum() > 0
    assert model.text_transformer.encoder.layer[5].output.dense.weight.grad.abs().sum() > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg_dict: dict, out: str, cache: str, steps: int, resume: bool):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from training.ctclip_data import CTCLIPDataset, PhantomCache
    cfg = replace(TrainConfig(**cfg_dict), steps=steps)
    dataset = CTCLIPDataset(PhantomCache(Path(cache)), build_model(cfg).preprocessing, augment=True, seed=0,
                            paired_text=cfg.text_text_weight > 0, with_labels=cfg.label_loss_weight > 0)
    train(cfg, Path(out), resume=resume, progress=False, dataset=dataset)
    # every rank holds the same weights after the all-reduced steps
    sd = torch.load(Path(out) / "ckpt.pt", weights_only=False)["model"]
    flat = torch.cat([v.float().ravel() for v in sd.values()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1])
    dist.destroy_process_group()


def test_ddp_two_cpu_processes_two_steps_and_resume(tiny_cache, tmp_path):
    cfg = TrainConfig(preset="demo", batch_size=2, lr=1e-3, steps=2, ckpt_every=1, ckpt_every_s=1e9, log_every=1,
                      text_max_length=48, frozen_text_layers=5, cache_text=True, amp=False, text_text_weight=1.0,
                      center_heads=4, cls_only_top_layer=True, label_loss_weight=1.0, model_overrides=tiny_overrides())
    from dataclasses import asdict
    out = tmp_path / "run"
    tmp_mp.spawn(_ddp_worker, args=(2, _free_port(), asdict(cfg), str(out), str(tiny_cache), 2, False), nprocs=2)
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 2 and "state" in ckpt["optimizer"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    before = ckpt["model"]
    # the DDP checkpoint resumes in a single process (same names: DDP's "module." prefix is not stored)
    dataset = CTCLIPDataset(PhantomCache(tiny_cache), build_model(cfg).preprocessing, augment=True,
                            seed=0, paired_text=True, with_labels=True)
    train(replace(cfg, steps=3), out, resume=True, progress=False, dataset=dataset)
    after = torch.load(out / "ckpt.pt", weights_only=False)
    assert after["step"] == 3
    changed = [k for k in before if before[k].dtype.is_floating_point and not torch.equal(before[k], after["model"][k])]
    assert changed                                                      # the resumed step trained
    assert (out / "model" / "config.json").exists()


def test_eval_writes_metrics(tmp_path):
    """ctclip-eval on a tiny untrained checkpoint and a 4-study test split: every metric present and in range."""
    from training.eval_ctclip import evaluate
    model = build_model(TrainConfig(preset="demo", text_max_length=48, model_overrides=tiny_overrides()))
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    metrics = evaluate(ckpt, cache_root=tmp_path / "cache", n_test=4, plan_size=5, bootstrap=20)
    written = json.loads((ckpt / "metrics.json").read_text())
    assert written["meta"]["n"] == 4 and written["n"] == 4
    assert written["report_to_volume"]["R@5"] == 1.0                    # K >= gallery size: always a hit
    assert 0.0 <= written["report_to_volume"]["R@10"] <= 1.0 and 0.0 <= written["map_at_10"] <= 1.0
    assert set(written["zero_shot"]["per_label"]) == set(LABELS)
    assert metrics["recall_at_10"] == written["recall_at_10"]
    lines = (tmp_path / "cache" / "test" / "studies.jsonl").read_text().splitlines()
    seeds = [json.loads(line)["seed"] for line in lines]
    assert min(seeds) == TEST_SEED_BASE
    # zero-shot: a softmax over the (present, not present) pair is the logistic of the scaled cosine difference
    from engine.models.ctclip import zero_shot_probabilities
    img = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    pos, neg = torch.nn.functional.normalize(torch.randn(18, 8), dim=-1), torch.nn.functional.normalize(
        torch.randn(18, 8), dim=-1)
    p = zero_shot_probabilities(img, torch.stack([pos, neg], dim=1), scale=10.0)
    want = 1 / (1 + torch.exp(-10.0 * (img @ pos.t() - img @ neg.t())))
    np.testing.assert_allclose(p.numpy(), want.numpy(), rtol=1e-5)


def test_export_leaves_the_frozen_text_layers_to_the_text_package(tmp_path):
    """ctclip-export drops the pretrained MiniLM tensors the run froze; loading restores them bit for bit."""
    from engine.models.ctclip import CTCLIP
    from training.train_ctclip import export_checkpoint
    cfg = TrainConfig(preset="demo", text_max_length=48, frozen_text_layers=5, model_overrides=tiny_overrides())
    run = tmp_path / "run"
    model = build_model(cfg)
    model.save_pretrained(run / "model")                               # float16, as training writes it
    torch.save({"model": {f"model.{k}": v for k, v in model.state_dict().items()}, "step": 0}, run / "ckpt.pt")
    from dataclasses import asdict
    (run / "train_config.json").write_text(json.dumps(asdict(cfg)))
    out = export_checkpoint(run, tmp_path / "asset", max_mb=0.0)
    assert out["compact"] is True
    full_mb = (run / "model" / "model.safetensors").stat().st_size / 1e6
    assert out["mb"] < full_mb / 2                                    # the MiniLM prefix is most of the file
    loaded = CTCLIP.from_pretrained(tmp_path / "asset")
    assert loaded.config.text.pretrained_tensors
    want = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        expected = want[name].half().float() if (want[name].ndim >= 2 and name not in
                                                  loaded.config.text.pretrained_tensors) else want[name]
        assert torch.equal(tensor, expected), name


def test_init_from_copies_a_saved_model_and_refuses_another_architecture(tmp_path):
    """--init-from (continued training) starts from every tensor of a saved CT CLIP; another shape is one error."""
    from engine.errors import UserError
    from training.train_ctclip import init_from_checkpoint
    cfg = TrainConfig(preset="demo", text_max_length=48, model_overrides=tiny_overrides())
    saved = build_model(cfg)
    saved.save_pretrained(tmp_path / "saved")                           # float16 on disk
    fresh = build_model(cfg)
    name = "visual_transformer.to_patch_emb.2.weight"                  # the patch Linear: random at build
    assert not torch.equal(fresh.state_dict()[name], saved.state_dict()[name].half().float())
    init_from_checkpoint(fresh, tmp_path / "saved")
    for key, tensor in fresh.state_dict().items():
        want = saved.state_dict()[key]
        assert torch.allclose(tensor, want.float(), atol=2e-3, rtol=1e-3), key     # up to the float16 rounding
    other = build_model(TrainConfig(preset="demo", text_max_length=48,
                                    model_overrides={**tiny_overrides(), "vision_dim": 48}))
    with pytest.raises(UserError, match="another architecture"):
        init_from_checkpoint(other, tmp_path / "saved")


def test_init_from_accepts_zero_initialised_additions(tmp_path):
    """A checkpoint without the density log-share projection continues into a model with it: the added tensors
    start at zero, so the continued model's image latents equal the saved model's."""
    from training.train_ctclip import init_from_checkpoint
    old = build_model(TrainConfig(preset="demo", text_max_length=48,
                                  model_overrides={**tiny_overrides(), "patch_hu_log_share": False})).eval()
    old.save_pretrained(tmp_path / "saved", half=False)
    new = build_model(TrainConfig(preset="demo", text_max_length=48,
                                  model_overrides={**tiny_overrides(), "patch_hu_log_share": True})).eval()
    added = init_from_checkpoint(new, tmp_path / "saved")
    assert added == ["visual_transformer.patch_density_emb.log_proj.bias",
                     "visual_transformer.patch_density_emb.log_proj.weight"]
    volume = torch.rand(1, 1, *TINY_SHAPE) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(new.encode_image(volume), old.encode_image(volume))
    # they learn at added_lr_mult x lr (they start from zero), and a resumed run finds the same names again
    from training.train_ctclip import init_from_additions, param_groups
    assert init_from_additions(new, tmp_path / "saved") == added
    cfg = TrainConfig(preset="demo", added_lr_mult=10.0)
    groups = param_groups(new, cfg, tuple(added))
    fast = [g for g in groups if g["lr_mult"] == 10.0]
    assert {id(p) for g in fast for p in g["params"]} == {id(p) for n, p in new.named_parameters() if n in added}


def test_training_cli_bad_checkpoint_is_one_json_sentence_and_exit_2(tmp_path, capsys):
    from training.__main__ import main
    for argv in (["ctclip-eval", "--checkpoint", str(tmp_path / "none")],
                 ["ctclip", "--preset", "demo", "--init-from", str(tmp_path / "none"), "--out", str(tmp_path / "run")]):
        assert main(argv) == 2
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert "is not a CT-CLIP directory" in out["error"] and "\n" not in out["error"]
    assert not (tmp_path / "run").exists()                  # a bad --init-from writes nothing into the run folder
