"""What every model of the engine shares: a nested dataclass config and a self-describing checkpoint folder.

A checkpoint folder (the way every diffusers component is one) holds
    config.json          the model's config (ModelConfig.to_dict: nested configs as nested objects)
    model.safetensors    the weights; weight matrices in float16 by default (see `half_state`), read back as float32
    preprocessing.json   how the model's input is prepared (engine.transforms.Preprocessing), when it takes a CT
    tokenizer/           when the model reads text
so a folder says by itself what it is and how to feed it. Loading builds the model on the meta device (no memory,
no random init) and assigns the file's tensors; a tensor the model has and the file lacks, or the reverse, is an
error that names them, never a silently half-loaded model.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import torch
from torch import nn

from engine.errors import UserError
from engine.transforms import Preprocessing

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREPROCESSING_FILE = "preprocessing.json"
TOKENIZER_DIR = "tokenizer"


class ModelConfig:
    """Mixin for a config dataclass: one to_dict / from_dict for any nesting of config dataclasses.

    Fields typed as another ModelConfig are written as nested objects and read back into that class; tuple fields
    come back as tuples (JSON has lists only). An unknown key is an error: it means the file is from another model."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"The {cls.__name__} has no field(s) {', '.join(unknown)}: the config is from another "
                            "model or another version.")
        values = {}
        for name, value in d.items():
            kind = hints[name]
            if isinstance(kind, type) and issubclass(kind, ModelConfig) and isinstance(value, dict):
                value = kind.from_dict(value)
            elif typing.get_origin(kind) is tuple and isinstance(value, list):
                value = tuple(value)
            values[name] = value
        return cls(**values)


def half_state(state: dict[str, torch.Tensor], keep_float32: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The fp16 storage policy: floating tensors with >= 2 dimensions (weight matrices, embeddings) in float16;
    0/1-D tensors (norms, biases, scales, temperature) and any tensor whose name contains one of `keep_float32`
    (e.g. a quantiser codebook, whose nearest-code lookup float16 would change) stay float32."""
    out = {}
    for name, tensor in state.items():
        if tensor.is_floating_point() and tensor.ndim >= 2 and not any(mark in name for mark in keep_float32):
            tensor = tensor.half()
        out[name] = tensor
    return out


def load_state_strictly(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Assign `state` into `model` (built on the meta device). Missing or unexpected tensors raise a UserError
    that names them; so does a shape mismatch (load_state_dict's own error)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = [f"{len(names)} {kind} tensor(s) ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''})"
                 for kind, names in (("missing", missing), ("unexpected", unexpected)) if names]
        raise UserError(f"The weights in '{source}' do not match its config: {'; '.join(parts)}.")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:  # shapes differ
        raise UserError(f"The weights in '{source}' do not match its config (tensor shapes differ).") from err


class PretrainedModel(nn.Module):
    """Base of the engine's models: save_pretrained / from_pretrained on a checkpoint folder (module docstring).

    A subclass sets `config_class` (a ModelConfig dataclass), `keep_float32` (name parts never stored in float16)
    and `model_name`, takes `config` as its only constructor argument, and may override the hooks
    `config_from_json` (old config layouts), `extra_state` (tensors that come from elsewhere than the weights
    file), `after_load` (rebuild non-persistent buffers), `save_extras` (e.g. a tokenizer) and
    `default_preprocessing`."""

    config_class: type = ModelConfig
    keep_float32: tuple[str, ...] = ()
    model_name: str = ""  # how messages name the model (default: the class name)

    # ----------------------------------------------------------------------------------------------- hooks
    @classmethod
    def config_from_json(cls, d: dict, directory: Path):
        return cls.config_class.from_dict(d)

    @classmethod
    def default_preprocessing(cls, config) -> Preprocessing | None:
        """The input preparation of a folder without preprocessing.json (None: the model takes no CT)."""
        return None

    def extra_state(self, device) -> dict[str, torch.Tensor]:
        return {}

    def after_load(self, device) -> None:
        pass

    def save_extras(self, directory: Path, config: dict) -> None:
        pass

    # ------------------------------------------------------------------------------------------- save / load
    @property
    def preprocessing(self) -> Preprocessing | None:
        """How this model's CT input is prepared: read from the checkpoint folder, else the config's default."""
        given = getattr(self, "_preprocessing", None)
        return given if given is not None else self.default_preprocessing(self.config)

    @preprocessing.setter
    def preprocessing(self, value: Preprocessing | None) -> None:
        self._preprocessing = value

    def save_pretrained(self, directory: str | Path, half: bool = True) -> Path:
        """Write config.json, model.safetensors (float16 policy of `half_state` when half), preprocessing.json
        and the subclass's extras (tokenizer/) so the folder is self-contained."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: t.detach().cpu() for name, t in self.state_dict().items()}
        if half:
            state = half_state(state, self.keep_float32)
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / WEIGHTS_FILE),
                  metadata={"format": "pt", "preset": str(getattr(self.config, "preset", ""))})
        config = self.config.to_dict()
        self.save_extras(directory, config)
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        if self.preprocessing is not None:
            (directory / PREPROCESSING_FILE).write_text(json.dumps(self.preprocessing.to_dict(), indent=2))
        return directory

    @classmethod
    def read_config(cls, directory: str | Path):
        """The config of a checkpoint folder (either layout the subclass reads)."""
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise UserError(f"'{directory}' is not a {cls.model_name or cls.__name__} directory (it needs "
                            f"{CONFIG_FILE} and {WEIGHTS_FILE}).")
        try:
            raw = json.loads((directory / CONFIG_FILE).read_text())
        except ValueError as err:
            raise UserError(f"'{directory / CONFIG_FILE}' is not valid JSON.") from err
        return cls.config_from_json(raw, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu"):
        """Load a folder written by save_pretrained (or by a converter in engine/convert); returns an eval() model
        in float32 with its folder's preprocessing."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config = cls.read_config(directory)
        with torch.device("meta"):
            model = cls(config)
        state = load_file(str(directory / WEIGHTS_FILE), device=str(device))
        state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
        state.update(model.extra_state(device))
        load_state_strictly(model, state, str(directory))
        model.after_load(device)
        leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if leftover:  # a non-persistent buffer nothing rebuilt: a bug in the subclass, not a user error
            raise RuntimeError(f"tensors left uninitialised after loading: {leftover[:5]}")
        if (directory / PREPROCESSING_FILE).is_file():
            model.preprocessing = read_preprocessing(directory / PREPROCESSING_FILE)
        return model.eval()


def read_preprocessing(path: Path) -> Preprocessing:
    """A checkpoint folder's preprocessing.json; a damaged or foreign file is one sentence."""
    try:
        return Preprocessing.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise UserError(f"'{path}' does not describe a preprocessing ({err}).") from None
