"""The one training loop every trainer runs (CT CLIP today; speech, CXR, VAE and diffusion trainers next).

A trainer builds its model and a *step module*: an nn.Module whose forward returns the loss, or (loss, logs) with
logs a dict of numbers for the log record (or (loss, anything) read by the trainer's own `logs` hook). It hands that
module to `TrainingLoop.run` with an optimizer factory and a dataset; the loop owns what is the same for every model:
- distributed set-up from torchrun's environment (WORLD_SIZE, LOCAL_RANK): DDP (gloo on CPU, nccl on GPU), or FSDP2
  (fully_shard per unit the trainer names) with FULL state dicts gathered on rank 0 for the checkpoint;
- deterministic global batches (StepSampler): resuming at step s reproduces the data stream;
- linear warm-up then constant or cosine lr over the run's progress, by steps or by a wall-clock time budget
  (whichever is further), so a run on a shared CPU ends on time with its schedule completed;
- autocast bf16 on GPU (a no-op on CPU), global grad-norm clipping;
- an atomic checkpoint (tmp file + os.replace) every `ckpt_every` steps / `ckpt_every_s` seconds and at the end:
  model, optimizer, step, rng states (torch, numpy, python), the run's config, elapsed seconds; `resume` continues
  from it at the same step with the same rng;
- OUT/train_log.jsonl (one JSON record per log step) and a tqdm bar on rank 0.

Checkpoint file OUT/ckpt.pt: {"model", "optimizer", "step", "rng", "config", "elapsed_s"} and one entry per
`extra_state` object (its state_dict()).
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm


@dataclass
class LoopConfig:
    """What the loop needs of a run. lr is the peak (after warm-up) in the optimizer's units; times in seconds;
    batch_size per process (the global batch is batch_size x world size)."""
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "constant"               # "constant" | "cosine" (to 5 % of lr) | "polynomial" ((1 - t)^2)
    time_budget_s: float = 0.0               # > 0: also stop (and finish the lr schedule) after this much training
    grad_clip: float = 0.0                   # max global grad norm; 0: no clipping
    amp: bool = True                         # autocast bf16, GPU only
    fsdp: bool = False                       # FSDP2 instead of DDP (several GPUs)
    seed: int = 0                            # torch seed (+ rank) and data order
    ckpt_every: int = 1000                   # steps
    ckpt_every_s: float = 600.0              # seconds (whichever comes first)
    log_every: int = 10                      # steps
    num_workers: int = 0                     # DataLoader worker processes

    @classmethod
    def from_config(cls, config) -> "LoopConfig":
        """The loop's fields of a trainer's own flat config dataclass, taken by name (others keep their default)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)})


# ---------------------------------------------------------------------------------------------- distributed set-up

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join the process group torchrun set up (WORLD_SIZE > 1): nccl on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device)


def wrap_for_training(step_module: nn.Module, d: Dist, fsdp: bool, shard_units=()) -> nn.Module:
    """FSDP2 (each of `shard_units`, then the whole step module), DDP when world > 1, else the module itself."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for unit in shard_units:
            fully_shard(unit)
        return fully_shard(step_module)
    if d.world > 1:
        return nn.parallel.DistributedDataParallel(step_module, device_ids=[d.device.index]
                                                   if d.device.type == "cuda" else None)
    return step_module


def _max_over_ranks(value: float) -> float:
    """The largest `value` of all processes (ranks must agree on the schedule and on when to stop or save)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


# ------------------------------------------------------------------------------------------------------------ data

class StepSampler(torch.utils.data.Sampler):
    """Deterministic global batches: epoch e is permutation rng([seed, e]); step s takes the next B * world indices,
    this rank its [rank::world] share. Yields, per step from `start` to `stop`, this rank's list of "global item
    numbers" epoch * n + i (EpochIndexed turns them back into (epoch, i)). Resuming at step s reproduces the stream."""

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int, start: int = 0, stop: int = 0):
        self.n, self.B, self.world, self.rank, self.seed, self.start, self.stop = \
            n, batch_size, world, rank, seed, start, stop
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise ValueError(f"{n} training items cannot fill one global batch of {batch_size * world}")

    def batch(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        g = perm[pos * self.B * self.world:(pos + 1) * self.B * self.world]
        return (g[self.rank::self.world] + epoch * self.n).tolist()

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.batch(step)

    def __len__(self):
        return max(0, self.stop - self.start)


class EpochIndexed(torch.utils.data.Dataset):
    """Item k of the stream = item k % n of `dataset` in epoch k // n (the dataset's draws depend on its epoch)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, k: int):
        n = len(self.dataset)
        if hasattr(self.dataset, "epoch"):
            self.dataset.epoch = k // n
        return self.dataset[k % n]


def to_device(batch, device: torch.device):
    """Tensors anywhere in a (nested) tuple/list/dict batch moved to `device`; everything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(x, device) for x in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


# -------------------------------------------------------------------------------------------------------- schedule

def progress_of(cfg: LoopConfig, step: int, elapsed_s: float) -> float:
    """Fraction of the run done: by steps, or by wall-clock time when a time budget is set (whichever is further).
    The budget is what makes a run on a shared CPU end on time with its lr schedule completed."""
    p = step / max(1, cfg.steps)
    if cfg.time_budget_s > 0:
        p = max(p, elapsed_s / cfg.time_budget_s)
    return min(1.0, p)


def lr_at(cfg: LoopConfig, step: int, progress: float | None = None) -> float:
    """Linear warm-up over warmup_steps, then constant, cosine (to 5 % of lr) or polynomial of power 2 (torch's
    PolynomialLR(power=2): lr (1 - t)^2, Text2CT's schedule) over the run's progress t."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule in ("cosine", "polynomial"):
        t = progress if progress is not None else step / max(1, cfg.steps)
        warm = cfg.warmup_steps / max(1, cfg.steps)
        t = min(1.0, max(0.0, (t - warm) / max(1e-9, 1 - warm)))
        if cfg.schedule == "polynomial":
            return cfg.lr * (1.0 - t) ** 2
        return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))
    return cfg.lr


# ------------------------------------------------------------------------------------------------------ one step

def autocast_for(device: torch.device, amp: bool):
    """Mixed precision where it pays: autocast bf16 on a CUDA device when `amp`; on CPU a disabled context."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def clip_gradients(module: nn.Module, max_norm: float) -> torch.Tensor:
    """Scale the trainable gradients so their global L2 norm is at most max_norm; returns the norm before clipping
    (0 when max_norm is 0: no clipping, no norm computed)."""
    if not max_norm:
        return torch.tensor(0.0)
    return nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], max_norm)


# ---------------------------------------------------------------------------------------------------- checkpoints

def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: Path) -> None:
    """torch.save to PATH.tmp, then os.replace: a crash mid-write leaves the previous file whole and no tmp file."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def full_state(wrapped: nn.Module, optimizer, fsdp: bool) -> tuple[dict, dict]:
    """Complete (unsharded) model and optimizer state dicts, gathered on rank 0 under FSDP."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(wrapped, options=opts), get_optimizer_state_dict(wrapped, optimizer, options=opts)
    return wrapped.state_dict(), optimizer.state_dict()


def save_checkpoint(path: Path, wrapped: nn.Module, optimizer, step: int, d: Dist, fsdp: bool, extra: dict,
                    on_saved: Callable[[], None] | None = None) -> None:
    """Every rank gathers (collective under FSDP); rank 0 writes {"model", "optimizer", "step", "rng", **extra}
    atomically (DDP's "module." prefix is not stored, so a DDP checkpoint loads in one process), then `on_saved`."""
    model_sd, optim_sd = full_state(wrapped, optimizer, fsdp)
    if d.main:
        model_sd = {k.removeprefix("module."): v for k, v in model_sd.items()}
        atomic_save({"model": model_sd, "optimizer": optim_sd, "step": step, "rng": rng_state(), **extra}, path)
        if on_saved is not None:
            on_saved()
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(path: Path, wrapped: nn.Module, step_module: nn.Module, optimizer, fsdp: bool) -> dict:
    """Load model and optimizer state from `path` into the (wrapped) step module; returns the whole checkpoint
    (its "rng" is for the caller to restore when nothing else will draw before the next step)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(wrapped, ckpt["model"], options=opts)
        set_optimizer_state_dict(wrapped, optimizer, ckpt["optimizer"], options=opts)
    else:
        step_module.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt


# ------------------------------------------------------------------------------------------------------- the loop

def _default_inputs(device: torch.device):
    """A batch -> the step module's (args, kwargs): a dict becomes keywords, a tuple/list positional arguments."""
    def inputs(batch):
        batch = to_device(batch, device)
        if isinstance(batch, dict):
            return (), batch
        return (tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)), {}
    return inputs


def _default_logs(output) -> dict:
    """A step module's (loss, {name: number or 0-d tensor}) -> those numbers as floats; anything else -> {}."""
    if isinstance(output, (tuple, list)) and len(output) > 1 and isinstance(output[1], dict):
        return {k: float(v) for k, v in output[1].items()}
    return {}


class TrainingLoop:
    """One run in OUT: set up the process (distributed group, device, seed) on construction, train on `run`.

    loop = TrainingLoop(LoopConfig(...), out_dir, resume=True)   # loop.dist, loop.resuming: build the model knowing
    loop.write_run_config(asdict(my_config))                     # them; OUT/train_config.json (rank 0)
    summary = loop.run(step_module, make_optimizer, dataset, collate=..., inputs=..., logs=...)

    `clock` (seconds) is time.time; tests pass a fake one to make the time budget deterministic."""

    def __init__(self, cfg: LoopConfig, out_dir: Path, resume: bool = False, progress: bool = True,
                 desc: str = "train", clock: Callable[[], float] = time.time):
        self.cfg, self.out_dir, self.progress, self.desc, self.clock = cfg, Path(out_dir), progress, desc, clock
        self.dist = setup_distributed()
        self.ckpt_path = self.out_dir / "ckpt.pt"
        self.resuming = bool(resume and self.ckpt_path.exists())
        self.run_config: dict = {}
        self.step, self.elapsed_before, self.t0 = 0, 0.0, clock()
        torch.manual_seed(cfg.seed + self.dist.rank)

    def write_run_config(self, config: dict) -> None:
        """OUT/train_config.json (rank 0), also stored in every checkpoint as "config"."""
        self.run_config = config
        if self.dist.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "train_config.json").write_text(json.dumps(config, indent=1))

    def run(self, step_module: nn.Module, make_optimizer: Callable[[], torch.optim.Optimizer], dataset, *,
            collate=None, inputs=None, logs=None, shard_units=(), on_checkpoint=None, extra_state=None) -> dict:
        """Train `step_module` (already on loop.dist.device) from step 0, or from OUT/ckpt.pt when resuming.

        make_optimizer(): called after DDP/FSDP wrapping (FSDP replaces the parameters); a param group's "lr_mult"
            scales the scheduled lr. collate: the DataLoader's (torch's default if None).
        inputs(batch) -> (args, kwargs) of the step module, on the device (default: the batch moved to the device).
        logs(output) -> dict added to a log record (rank 0, log steps only), output = what the step module returned
            (default: the dict of a (loss, {name: number}) output).
        shard_units: the modules FSDP shards one by one (transformer blocks). on_checkpoint(): rank 0, after each
        checkpoint (e.g. save_pretrained). extra_state: {name: object with state_dict() / load_state_dict()} (an
        EMA copy, a GradScaler...) saved in the checkpoint under `name` and loaded back on resume.
        Returns {"steps", "elapsed_s", "out"}."""
        cfg, d = self.cfg, self.dist
        wrapped = wrap_for_training(step_module, d, cfg.fsdp, shard_units)
        optimizer = make_optimizer()
        start, self.elapsed_before, rng = 0, 0.0, None
        if self.resuming:
            ckpt = load_checkpoint(self.ckpt_path, wrapped, step_module, optimizer, cfg.fsdp)
            start, self.elapsed_before, rng = ckpt["step"], ckpt.get("elapsed_s", 0.0), ckpt["rng"]
            for name, obj in (extra_state or {}).items():
                obj.load_state_dict(ckpt[name])
            if d.main:
                print(f"resumed from {self.ckpt_path} at step {start}", flush=True)
        sampler = StepSampler(len(dataset), cfg.batch_size, d.world, d.rank, cfg.seed, start=start, stop=cfg.steps)
        loader = torch.utils.data.DataLoader(EpochIndexed(dataset), batch_sampler=sampler, collate_fn=collate,
                                             num_workers=cfg.num_workers, persistent_workers=False,
                                             pin_memory=d.device.type == "cuda")
        batches = iter(loader)       # draws the loader's base seed from torch's rng: restore the rng after it
        if rng is not None:
            set_rng_state(rng)

        def save():
            save_checkpoint(self.ckpt_path, wrapped, optimizer, self.step, d, cfg.fsdp,
                            {"config": self.run_config, "elapsed_s": self.elapsed(),
                             **{k: v.state_dict() for k, v in (extra_state or {}).items()}}, on_checkpoint)
        self.step, self.t0 = start, self.clock()
        wrapped.train()
        self._train(wrapped, step_module, optimizer, batches, inputs or _default_inputs(d.device),
                    logs or _default_logs, save)
        summary = {"steps": self.step, "elapsed_s": self.elapsed(), "out": str(self.out_dir)}
        if dist.is_initialized():
            dist.barrier()
        return summary

    def elapsed(self) -> float:
        """Seconds of training in this run, earlier sessions of a resumed run included."""
        return self.elapsed_before + self.clock() - self.t0

    def _train(self, wrapped, step_module, optimizer, batches, inputs, logs, save) -> None:
        cfg, d = self.cfg, self.dist
        log = open(self.out_dir / "train_log.jsonl", "a") if d.main else None
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.desc, unit="step",
                   disable=not (self.progress and d.main), dynamic_ncols=True)
        last_ckpt, saved_step, losses = self.clock(), self.step, []
        try:
            for batch in batches:
                elapsed = _max_over_ranks(self.elapsed()) if cfg.time_budget_s > 0 else self.elapsed()
                progress = progress_of(cfg, self.step, elapsed)
                if progress >= 1.0 and self.step > 0:
                    break
                lr = lr_at(cfg, self.step, progress)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_mult", 1.0)
                args, kwargs = inputs(batch)
                output, loss, grad_norm = self._step(wrapped, step_module, optimizer, args, kwargs)
                self.step += 1
                losses.append(float(loss.detach()))
                bar.update(1)
                if d.main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    rec = {"step": self.step, "loss": float(np.mean(losses)), "lr": lr, "grad_norm": float(grad_norm),
                           "progress": progress, **logs(output), "elapsed_s": self.elapsed()}
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{rec['loss']:.3f}")
                    losses = []
                due = self.step % cfg.ckpt_every == 0 or self.clock() - last_ckpt > cfg.ckpt_every_s
                if _max_over_ranks(float(due)) or self.step == cfg.steps:   # every rank enters the collective save
                    save()
                    last_ckpt, saved_step = self.clock(), self.step
            if saved_step != self.step:       # stopped by the time budget between checkpoints: save where it ended
                save()
        finally:
            bar.close()
            if log:
                log.close()

    def _step(self, wrapped, step_module, optimizer, args, kwargs):
        """Forward (autocast on GPU), backward, clip, optimizer step: (output, loss, grad norm before clipping)."""
        with autocast_for(self.dist.device, self.cfg.amp):
            output = wrapped(*args, **kwargs)
        loss = output[0] if isinstance(output, (tuple, list)) else output
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_gradients(step_module, self.cfg.grad_clip)
        optimizer.step()
        return output, loss, grad_norm
