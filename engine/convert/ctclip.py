"""Loaders for official checkpoints: CT-CLIP_v2.pt (ibrahimethemhamamci/CT-CLIP) into engine.models.ctclip.CTCLIP.

The official file is a raw, flat `torch.save` of the model's state dict (transformers 4.30.1, vector-quantize-pytorch
1.1.2). Differences handled by `map_official_ctclip`, by meaning rather than by name alone:
- a `module.` prefix (a DDP-wrapped save) is stripped;
- `text_transformer.embeddings.position_ids` (persisted by transformers < 4.31) is dropped;
- the CT-ViT decoder heads (to_patch_emb_first_frame, to_pixels*) are dropped, explicitly, when the model lacks them;
- the quantiser codebook buffers are mapped from the 1.1.2 layout (initted [1] f32, cluster_size [1, K], embed
  [1, K, d]) or from newer layouts (0-d bool initted, [K] / [K, d] shapes, an extra `embed_avg` EMA sum, dropped);
- `to_text_latent_extra` / `to_visual_latent_extra` (unused copies, 151 M parameters) are kept when the model has
  them (strict name compatibility) and dropped, explicitly, when it does not.
Pickled files are read with `weights_only=True`; a file needing arbitrary code is refused unless allow_pickle=True.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from engine.errors import UserError

DROPPED_ALWAYS = {
    "text_transformer.embeddings.position_ids": "non-persistent buffer in transformers >= 4.31 (rebuilt at init)",
    "text_transformer.embeddings.token_type_ids": "non-persistent buffer in transformers >= 4.31 (rebuilt at init)",
}
EXTRA_PROJECTIONS = ("to_text_latent_extra.weight", "to_visual_latent_extra.weight")
UNUSED_CTVIT_HEADS = ("visual_transformer.to_patch_emb_first_frame.", "visual_transformer.to_pixels")
VQ_PREFIX = "visual_transformer.vq._codebook."


@dataclass
class LoadReport:
    """What happened to every key of the official file."""

    loaded: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)  # official name -> our name (prefix / layout changes)
    dropped: dict[str, str] = field(default_factory=dict)  # official name -> reason
    missing: list[str] = field(default_factory=list)  # ours, absent from the file
    unexpected: list[str] = field(default_factory=list)  # in the file, unknown to us
    mismatched: dict[str, str] = field(default_factory=dict)  # name -> "file shape vs model shape"

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded", f"{len(self.dropped)} dropped"]
        for label, items in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("shape mismatch", list(self.mismatched))):
            if items:
                shown = ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")
                parts.append(f"{len(items)} {label} ({shown})")
        return "; ".join(parts)


# ------------------------------------------------------------------------------------------------ reading files


def load_torch_file(path: str | Path, allow_pickle: bool = False):
    """The object a torch .pt/.pth/.bin file holds, on the CPU, read with weights_only=True; a file that needs
    arbitrary code to unpickle is refused unless allow_pickle (a pickle can run code)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Checkpoint file not found: {path}.")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise UserError(f"{path.name} is not a readable PyTorch checkpoint.") from err
        if not allow_pickle:
            raise UserError(
                f"{path.name} needs arbitrary code to unpickle; load it with allow_pickle=True only if you trust it."
            ) from err
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError) as err:
        raise UserError(f"{path.name} is not a readable PyTorch checkpoint (truncated or not a torch file).") from err


def read_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from a .safetensors or torch .pt/.pth/.bin file, on the CPU.

    Common wrappers ({"state_dict": ...}, {"model": ...}) are unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Checkpoint file not found: {path}.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = load_torch_file(path, allow_pickle)
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path.name} does not contain a state dict of tensors.")
    return state


# ------------------------------------------------------------------------------------------------ CT-CLIP


def _codebook_tensor(kind: str, tensor: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bring one quantiser buffer of any known layout to ours (1.1.2): same meaning, target shape, float32."""
    if kind == "initted":  # [1] f32, [] bool, ...: "codebook initialised?" -> [1] float 1/0
        if tensor.is_meta:
            return torch.empty(target.shape, dtype=target.dtype, device="meta")
        return torch.full(target.shape, float(bool(tensor.flatten()[0])), dtype=target.dtype)
    if tensor.numel() != target.numel():
        raise UserError(f"The checkpoint's quantiser '{kind}' has {tensor.numel()} values, the model expects "
                        f"{target.numel()} (codebook size or dimension differ).")
    return tensor.reshape(target.shape).to(target.dtype)


def map_official_ctclip(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Rename/convert an official CT-CLIP state dict to the names and shapes of `expected` (our model's state_dict,
    possibly on the meta device). Returns the mapped dict (only keys we have) and a report."""
    report = LoadReport()
    out: dict[str, torch.Tensor] = {}
    has_module_prefix = bool(state) and all(k.startswith("module.") for k in state)
    for key, tensor in state.items():
        name = key[len("module."):] if has_module_prefix else key
        if name != key:
            report.renamed[key] = name
        if name in DROPPED_ALWAYS:
            report.dropped[key] = DROPPED_ALWAYS[name]
            continue
        if name in EXTRA_PROJECTIONS and name not in expected:
            report.dropped[key] = "unused extra projection (extra_latent_projection=False); model built without it"
            continue
        if name.startswith(UNUSED_CTVIT_HEADS) and name not in expected:
            report.dropped[key] = "decoder-side CT-ViT head unused by CT-CLIP; model built without it"
            continue
        if name.startswith(VQ_PREFIX):
            kind = name[len(VQ_PREFIX):]
            if VQ_PREFIX + "embed" not in expected:
                report.dropped[key] = "vector quantiser buffer; this model has no quantiser (use_vq=False)"
                continue
            if kind not in ("initted", "cluster_size", "embed"):
                report.dropped[key] = "quantiser state of a newer library layout, not needed for lookup or EMA"
                continue
            out[name] = _codebook_tensor(kind, tensor, expected[name])
            report.loaded.append(name)
            continue
        if name not in expected:
            report.unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(expected[name].shape):
            report.mismatched[name] = f"{tuple(tensor.shape)} in the file vs {tuple(expected[name].shape)}"
            continue
        out[name] = tensor
        report.loaded.append(name)
    report.missing = [k for k in expected if k not in out]
    return out, report


def load_official_ctclip(
    path_or_state,
    model,
    *,
    allow_pickle: bool = False,
    strict: bool = True,
    assign: bool = False,
) -> LoadReport:
    """Load CT-CLIP_v2.pt (path, or an already-read state dict) into an engine.models.ctclip.CTCLIP (paper preset).

    Raises UserError naming the offending keys if anything is missing, unexpected or mis-shaped (strict), else
    loads what matches. The *_extra projections are kept if the model has them, otherwise dropped and reported.
    assign=True puts the file's tensors into the model as they are (for a model built on the meta device; then call
    model.after_load(device))."""
    state = path_or_state if isinstance(path_or_state, dict) else read_state_dict(path_or_state, allow_pickle)
    mapped, report = map_official_ctclip(state, model.state_dict())
    if strict and not report.ok:
        raise UserError(f"The checkpoint does not match this CT-CLIP configuration: {report.summary()}.")
    model.load_state_dict(mapped, strict=False, assign=assign)
    return report


def convert_official_ctclip(
    src: str | Path, out_dir: str | Path, *, keep_unused_modules: bool = False, allow_pickle: bool = False,
    config=None,
) -> Path:
    """One-time conversion of CT-CLIP_v2.pt to a directory CTCLIP.from_pretrained reads (config.json +
    model.safetensors, float32). By default the unused modules (the two *_extra projections, 1.2 GB, and the CT-ViT
    decoder heads) are left out. `config` defaults to CTCLIPConfig.paper()."""
    from safetensors.torch import save_file

    from engine.models.base import CONFIG_FILE, PREPROCESSING_FILE, WEIGHTS_FILE
    from engine.models.ctclip import CTCLIP, CTCLIPConfig

    config = config or CTCLIPConfig.paper()
    config = replace(config, official_extra_projections=keep_unused_modules,
                     vision=replace(config.vision, official_decoder_heads=keep_unused_modules))
    with torch.device("meta"):
        expected = CTCLIP(config).state_dict()
    mapped, report = map_official_ctclip(read_state_dict(src, allow_pickle), expected)
    if not report.ok:
        raise UserError(f"The checkpoint does not match this CT-CLIP configuration: {report.summary()}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in mapped.items()}, str(out_dir / WEIGHTS_FILE),
              metadata={"format": "pt", "preset": config.preset, "source": Path(src).name})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    (out_dir / PREPROCESSING_FILE).write_text(json.dumps(config.default_preprocessing().to_dict(), indent=2))
    return out_dir


def load_ctclip_directory(directory: str | Path, *, allow_pickle: bool = False):
    """The paper preset from a user's weights folder, ready for inference (eval mode).

    The folder holds either a converted checkpoint (config.json + model.safetensors, as convert_official_ctclip or
    CTCLIP.save_pretrained write) or the official CT-CLIP_v2.pt, converted once into DIR/converted/ on first use.
    The CXR-BERT tokenizer is taken from DIR/tokenizer/ when present, else from the hub id (users with hub access)."""
    from engine.models.base import CONFIG_FILE, WEIGHTS_FILE
    from engine.models.ctclip import CTCLIP

    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"The weights folder '{directory}' does not exist.")
    if (directory / CONFIG_FILE).is_file() and (directory / WEIGHTS_FILE).is_file():
        target = directory
    else:
        official = directory / "CT-CLIP_v2.pt"
        if not official.is_file():
            raise UserError(f"'{directory}' holds neither CT-CLIP_v2.pt nor a converted checkpoint "
                            f"({CONFIG_FILE} + {WEIGHTS_FILE}).")
        target = directory / "converted"
        if not (target / WEIGHTS_FILE).is_file():
            convert_official_ctclip(official, target, allow_pickle=allow_pickle)
    tokenizer = directory / "tokenizer"
    if tokenizer.is_dir():
        config = CTCLIP.read_config(target)
        if not config.text.tokenizer_path:
            config.text.tokenizer_path = str(tokenizer.resolve())
            (target / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    return CTCLIP.from_pretrained(target)
