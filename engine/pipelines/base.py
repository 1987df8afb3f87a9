"""The convention every pipeline follows (the CT CLIP's now, the generator's, speech's and radiograph's later).

A pipeline composes loaded models with their preprocessing (the diffusers way). Every call that takes time accepts
three keyword arguments, the same in every pipeline:
    seed       an int or a torch.Generator: the only source of randomness (`make_generator`); None = seed 0 for
               pipelines that sample, ignored by deterministic ones (documented per call)
    progress   a callable progress(fraction done in [0, 1], message) called between steps (e.g. a Gradio bar)
    cancel     a threading.Event, or a callable returning True, checked between steps: once set, the call raises
               `Cancelled` at the next step boundary (a running model step is never interrupted half-way)
`RunControl` bundles progress and cancel so a pipeline writes `control.step(0.5, "encoding")` between its steps.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ProgressCallback = Callable[[float, str], None]
CancelSignal = threading.Event | Callable[[], bool]


class Cancelled(Exception):
    """A pipeline call stopped because its caller asked it to (the `cancel` event was set)."""


def held_out_zero_shot(directory: Path | None, field: str) -> dict[str, float]:
    """label -> `field` ("auroc", "threshold", ...) of the zero-shot figures that the training package's evaluation
    wrote on the held-out test split into a checkpoint folder's metrics.json (its "zero_shot" -> "per_label"); {} when
    the folder has none or the file is not of that form. Labels without that figure are left out."""
    from engine.labels import LABELS

    path = Path(directory) / "metrics.json" if directory else None
    if path is None or not path.is_file():
        return {}
    try:
        per_label = json.loads(path.read_text())["zero_shot"]["per_label"]
        return {label: float(per_label[label][field]) for label in LABELS
                if per_label.get(label, {}).get(field) is not None}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def make_generator(seed: int | torch.Generator | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator from a seed (None -> 0), or the caller's own generator unchanged."""
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator(device=device).manual_seed(0 if seed is None else int(seed))


@dataclass
class RunControl:
    """Progress reporting and cancellation for one pipeline call (both optional)."""

    progress: ProgressCallback | None = None
    cancel: CancelSignal | None = None

    @property
    def cancelled(self) -> bool:
        if self.cancel is None:
            return False
        return self.cancel.is_set() if isinstance(self.cancel, threading.Event) else bool(self.cancel())

    def step(self, fraction: float, message: str) -> None:
        """A step boundary: raise Cancelled if cancellation was asked, else report `fraction` done."""
        if self.cancelled:
            raise Cancelled(f"Cancelled before: {message}.")
        if self.progress is not None:
            self.progress(min(1.0, max(0.0, float(fraction))), message)
