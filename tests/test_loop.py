"""training/loop.py on a tiny regression: the lr schedule, the time budget and an exact resume, the atomic
checkpoint, gradient clipping, autocast only on GPU. (The 2-process DDP run is in test_train_ctclip.py.)"""
from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from training.loop import LoopConfig, TrainingLoop, autocast_for, lr_at, progress_of


class Regression(torch.utils.data.Dataset):
    """16 fixed items (x (4,), y = x . (1, -2, 0.5, 3))."""

    def __init__(self, n: int = 16):
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class FakeClock:
    """Seconds that pass only when a step runs (each forward adds one): a time budget stops at a known step."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class NoisyStep(nn.Module):
    """loss = mean squared error of a linear model on x + N(0, 0.1^2) noise drawn from torch's global rng, so a
    resume that restored the wrong rng state (or the wrong batch) trains differently. Records (x, noise) per step."""

    def __init__(self, clock: FakeClock | None = None, scale: float = 1.0):
        super().__init__()
        self.linear, self.clock, self.scale, self.seen = nn.Linear(4, 1), clock, scale, []

    def forward(self, x, y):
        noise = 0.1 * torch.randn_like(x)
        self.seen.append((x.clone(), noise.clone()))
        if self.clock is not None:
            self.clock.now += 1.0
        return self.scale * ((self.linear(x + noise).squeeze(1) - y) ** 2).mean(), {"batch": len(x)}


def run(out: Path, cfg: LoopConfig, resume: bool = False, clock: FakeClock | None = None, scale: float = 1.0,
        **hooks):
    loop = TrainingLoop(cfg, out, resume=resume, progress=False, clock=clock or FakeClock())
    step = NoisyStep(clock, scale)
    loop.write_run_config({"trainer": "test"})
    summary = loop.run(step, lambda: torch.optim.SGD(step.parameters(), lr=cfg.lr), Regression(), **hooks)
    return step, summary


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_schedule_warms_up_then_follows_the_cosine_by_steps_or_by_time():
    cfg = LoopConfig(lr=1.0, steps=10, warmup_steps=2, schedule="cosine")
    # warm-up: (step + 1) / 2; then t = (step / 10 - 0.2) / 0.8 and lr = 0.05 + 0.475 (1 + cos(pi t))
    assert lr_at(cfg, 0) == 0.5 and lr_at(cfg, 1) == 1.0 and lr_at(cfg, 2) == 1.0
    assert lr_at(cfg, 6) == pytest.approx(0.525)                         # t = 0.5
    assert lr_at(cfg, 4) == pytest.approx(0.05 + 0.475 * (1 + math.sqrt(0.5)))  # t = 0.25
    assert lr_at(cfg, 10) == pytest.approx(0.05)
    assert lr_at(replace(cfg, schedule="constant"), 6) == 1.0
    budget = replace(cfg, time_budget_s=100.0)                       # 60 of 100 s gone at step 3 of 10: t = 0.5
    assert progress_of(budget, 3, 60.0) == pytest.approx(0.6)
    assert lr_at(budget, 3, progress_of(budget, 3, 60.0)) == pytest.approx(0.525)
    assert progress_of(budget, 9, 10.0) == pytest.approx(0.9)        # steps ahead of the clock: steps count
    assert progress_of(budget, 3, 500.0) == 1.0


def test_the_loop_sets_the_scheduled_lr_at_every_step(tmp_path):
    cfg = LoopConfig(steps=10, batch_size=2, lr=1.0, warmup_steps=2, schedule="cosine", log_every=1, amp=False)
    run(tmp_path, replace(cfg, lr=1e-3))
    logged = [r["lr"] for r in log_of(tmp_path)]
    assert [r["step"] for r in log_of(tmp_path)] == list(range(1, 11))
    assert logged == pytest.approx([1e-3 * lr_at(cfg, s) for s in range(10)])
    assert logged[6] == pytest.approx(0.525e-3) and logged[0] == pytest.approx(0.5e-3)
    assert all(r["batch"] == 2 for r in log_of(tmp_path))     # the step module's logs hook reaches the record


def test_time_budget_stops_and_resume_continues_exactly(tmp_path):
    cfg = LoopConfig(steps=8, batch_size=2, lr=0.05, warmup_steps=2, time_budget_s=3.5, ckpt_every=1000,
                     ckpt_every_s=1e9, log_every=1, amp=False)
    clock = FakeClock()
    _, summary = run(tmp_path / "cut", cfg, clock=clock)
    assert summary["steps"] == 4 and summary["elapsed_s"] == 4.0     # 4 s >= 3.5 s: stopped before step 5
    ckpt = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 4 and ckpt["elapsed_s"] == 4.0 and ckpt["config"] == {"trainer": "test"}
    assert [r["progress"] for r in log_of(tmp_path / "cut")] == pytest.approx([0, 1 / 3.5, 2 / 3.5, 3 / 3.5])
    # the rest without a budget, against one uninterrupted run
    resumed, summary = run(tmp_path / "cut", replace(cfg, time_budget_s=0.0), resume=True, clock=FakeClock())
    whole, _ = run(tmp_path / "whole", replace(cfg, time_budget_s=0.0))
    assert summary["steps"] == 8 and summary["elapsed_s"] == 8.0
    assert len(resumed.seen) == 4 and len(whole.seen) == 8
    for (x, noise), (x_want, noise_want) in zip(resumed.seen, whole.seen[4:]):
        assert torch.equal(x, x_want)                                   # the same batches
        assert torch.equal(noise, noise_want)                           # the same rng draws
    for name, p in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], p), name
    assert [r["step"] for r in log_of(tmp_path / "cut")] == list(range(1, 9))


def test_a_crash_mid_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    cfg = LoopConfig(steps=2, batch_size=2, lr=0.05, amp=False)
    first, _ = run(tmp_path, cfg)
    real_save = torch.save

    def disk_full(obj, path):           # writes half the file, then fails as a full disk would
        buf = io.BytesIO()
        real_save(obj, buf)
        Path(path).write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
        raise OSError("No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        run(tmp_path, replace(cfg, steps=3), resume=True)
    monkeypatch.undo()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 2
    assert torch.equal(ckpt["model"]["linear.weight"], first.linear.weight.detach())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "train_config.json", "train_log.jsonl"]


def test_extra_state_is_saved_and_restored_and_on_checkpoint_runs_after_each_save(tmp_path):
    saved = []
    ema, fresh = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        ema.weight.fill_(0.25)
        fresh.weight.zero_()
    cfg = LoopConfig(steps=3, batch_size=2, ckpt_every=2, amp=False)
    run(tmp_path, cfg, extra_state={"ema": ema}, on_checkpoint=lambda: saved.append(len(saved)))
    assert saved == [0, 1]                                              # at step 2 and at the end (step 3)
    assert torch.equal(torch.load(tmp_path / "ckpt.pt", weights_only=False)["ema"]["weight"], ema.weight)
    run(tmp_path, replace(cfg, steps=4), resume=True, extra_state={"ema": fresh})
    assert torch.equal(fresh.weight, ema.weight)                        # loaded back on resume


def test_gradient_clipping_bounds_the_update(tmp_path):
    """SGD with lr 1 moves the weights by exactly the (clipped) gradient: its norm is at most grad_clip."""
    cfg = LoopConfig(steps=1, batch_size=4, lr=1.0, grad_clip=1.0, log_every=1, amp=False)
    clipped, _ = run(tmp_path / "clip", cfg, scale=1000.0)
    free, _ = run(tmp_path / "free", replace(cfg, grad_clip=0.0), scale=1000.0)
    torch.manual_seed(cfg.seed)
    start = NoisyStep()                                       # the same initial weights (same seed, same draws)

    def update_norm(step):
        moves = [(a - b).detach().ravel() for a, b in zip(step.parameters(), start.parameters())]
        return float(torch.cat(moves).norm())
    assert 0.999 < update_norm(clipped) <= 1.0 + 1e-5
    assert update_norm(free) > 100.0
    assert log_of(tmp_path / "clip")[0]["grad_norm"] == pytest.approx(update_norm(free), rel=1e-4)


def test_autocast_only_on_cuda(tmp_path):
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):                 # what an enabled CPU autocast would do
        assert (a @ b).dtype == torch.bfloat16
    with autocast_for(torch.device("cpu"), amp=True):
        assert not torch.is_autocast_enabled("cpu") and (a @ b).dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                               # "CUDA is not available" on this machine
        gpu = autocast_for(torch.device("cuda", 0), amp=True)
        off = autocast_for(torch.device("cuda", 0), amp=False)
    assert gpu.device == "cuda" and gpu.fast_dtype == torch.bfloat16
    assert off.device == "cpu" and not off._enabled
    cfg = LoopConfig(steps=3, batch_size=2, lr=0.05)
    with_amp, _ = run(tmp_path / "amp", replace(cfg, amp=True))
    without, _ = run(tmp_path / "fp32", replace(cfg, amp=False))
    assert all(torch.equal(p, q) for p, q in zip(with_amp.parameters(), without.parameters()))
