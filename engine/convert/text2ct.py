"""Loaders for Text2CT's public checkpoints (huggingface dmolino/text2ct-weights, code cosbidev/Text2CT @ 20064c9).

    autoencoder_epoch273.pt              -> engine.models.vae.CTAutoencoder (paper).network
    unet_rflow_200ep.pt                  -> engine.models.diffusion_unet.DiffusionUNet (paper).network (+ scale factor)
    CLIP3D_Finding_Impression_30ep.pt    -> engine.models.clip3d.CLIP3D (paper)

Which MONAI classes match: the official autoencoder and U-Net were built with MAISI's own networks,
`monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi` and
`...diffusion_model_unet_maisi.DiffusionModelUNetMaisi`; their state-dict names and shapes equal the manifests
(../shared/manifests/text2ct_autoencoder.json, text2ct_unet.json) entry for entry, so those two files load into our
models' `network` attribute with NO renaming. MONAI's generic AutoencoderKL / DiffusionModelUNet do not match
(one `conv` level less in every convolution name; no spacing layer), which is why the paper presets use the MAISI
classes. Key handling (every change has its reason in the LoadReport):
- all three: a `module.` prefix (a DDP-wrapped save) is stripped;
- U-Net: the file is a raw state dict or {"epoch", "loss", "num_train_timesteps", "scale_factor" (0-d tensor,
  perhaps saved on CUDA), "unet_state_dict"}; the scale factor, when present, goes into the U-Net's config (a raw
  state dict keeps Text2CT's 1.0287);
- CLIP3D: every key has the `model.` prefix of Text2CT's FrozenCLIP3D wrapper (stripped);
  `text_model.embeddings.position_ids` (persisted by transformers 4.30) is dropped (non-persistent and rebuilt
  since transformers 4.31); the CT-ViT's quantiser codebook is mapped by meaning as for CT-CLIP.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from engine.convert.ctclip import LoadReport, _codebook_tensor, load_torch_file, read_state_dict
from engine.errors import UserError

AUTOENCODER_FILE = "autoencoder_epoch273.pt"
UNET_FILE = "unet_rflow_200ep.pt"
CLIP3D_FILE = "CLIP3D_Finding_Impression_30ep.pt"
CLIP3D_WRAPPER_PREFIX = "model."
CLIP3D_DROPPED = {
    "text_model.embeddings.position_ids": "non-persistent buffer in transformers >= 4.31 (rebuilt at load)",
}
VQ_PREFIX = "vision_model.vq._codebook."


def map_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, strip_prefix: str = "",
              dropped: dict[str, str] | None = None) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Official names -> ours: strip `module.` (DDP) and `strip_prefix` (a wrapper), drop the `dropped` names (with
    their reasons), map quantiser buffers by meaning; compare names and shapes with `expected` (our state dict,
    possibly on the meta device)."""
    dropped = dropped or {}
    report = LoadReport()
    out: dict[str, torch.Tensor] = {}
    ddp = bool(state) and all(k.startswith("module.") for k in state)
    for key, tensor in state.items():
        name = key.removeprefix("module.") if ddp else key
        if strip_prefix and name.startswith(strip_prefix):
            name = name[len(strip_prefix):]
        if name != key:
            report.renamed[key] = name
        if name in dropped:
            report.dropped[key] = dropped[name]
            continue
        if name.startswith(VQ_PREFIX) and name[len(VQ_PREFIX):] not in ("initted", "cluster_size", "embed"):
            report.dropped[key] = "quantiser state of a newer library layout (e.g. embed_avg), not needed for lookup"
            continue
        if name not in expected:
            report.unexpected.append(key)
            continue
        if name.startswith(VQ_PREFIX):  # the same quantiser library layouts as CT-CLIP's (engine/convert/ctclip.py)
            tensor = _codebook_tensor(name[len(VQ_PREFIX):], tensor, expected[name])
        if tuple(tensor.shape) != tuple(expected[name].shape):
            report.mismatched[name] = f"{tuple(tensor.shape)} in the file vs {tuple(expected[name].shape)}"
            continue
        out[name] = tensor
        report.loaded.append(name)
    report.missing = [k for k in expected if k not in out]
    return out, report


def _load(module: torch.nn.Module, mapped: dict, report: LoadReport, what: str, assign: bool) -> LoadReport:
    if not report.ok:
        raise UserError(f"The checkpoint does not match the {what} configuration: {report.summary()}.")
    module.load_state_dict(mapped, strict=True, assign=assign)
    return report


def load_text2ct_autoencoder(path_or_state, model, *, allow_pickle: bool = False, assign: bool = False) -> LoadReport:
    """autoencoder_epoch273.pt (path or state dict) into a CTAutoencoder built with VAEConfig.paper()."""
    state = path_or_state if isinstance(path_or_state, dict) else read_state_dict(path_or_state, allow_pickle)
    mapped, report = map_state(state, model.network.state_dict())
    return _load(model.network, mapped, report, "Text2CT autoencoder", assign)


def split_unet_checkpoint(obj) -> tuple[dict[str, torch.Tensor], float | None]:
    """(state dict, scale factor or None) from either form of unet_rflow_200ep.pt."""
    if isinstance(obj, dict) and isinstance(obj.get("unet_state_dict"), dict):
        scale = obj.get("scale_factor")
        scale = float(scale.detach().cpu()) if isinstance(scale, torch.Tensor) else scale
        return obj["unet_state_dict"], (float(scale) if scale is not None else None)
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    raise UserError("The U-Net file holds neither a state dict nor Text2CT's {'unet_state_dict', ...} wrapper.")


def load_text2ct_unet(path_or_obj, model, *, allow_pickle: bool = False, assign: bool = False) -> LoadReport:
    """unet_rflow_200ep.pt (path, state dict or wrapper dict) into a DiffusionUNet built with
    DiffusionUNetConfig.paper(); the file's scale factor, when it has one, replaces the config's."""
    obj = path_or_obj if isinstance(path_or_obj, dict) else load_torch_file(path_or_obj, allow_pickle)
    state, scale = split_unet_checkpoint(obj)
    mapped, report = map_state(state, model.network.state_dict())
    _load(model.network, mapped, report, "Text2CT U-Net", assign)
    if scale is not None:
        model.config = replace(model.config, scale_factor=scale)
    return report


def load_text2ct_clip3d(path_or_state, model, *, allow_pickle: bool = False, assign: bool = False) -> LoadReport:
    """CLIP3D_Finding_Impression_30ep.pt into a CLIP3D (paper); call model.after_load(device) after assign=True."""
    state = path_or_state if isinstance(path_or_state, dict) else read_state_dict(path_or_state, allow_pickle)
    mapped, report = map_state(state, model.state_dict(), strip_prefix=CLIP3D_WRAPPER_PREFIX, dropped=CLIP3D_DROPPED)
    return _load(model, mapped, report, "CLIP3D", assign)


def convert_text2ct_directory(directory: str | Path, out_dir: str | Path, *, allow_pickle: bool = False) -> Path:
    """One-time conversion of a folder with the three official files into three checkpoint folders under out_dir
    (vae/, unet/, clip3d/), each read by its model's from_pretrained (safetensors, float32)."""
    from engine.models.clip3d import CLIP3D, CLIP3DConfig
    from engine.models.diffusion_unet import DiffusionUNet, DiffusionUNetConfig
    from engine.models.vae import CTAutoencoder, VAEConfig

    directory, out_dir = Path(directory), Path(out_dir)
    jobs = ((AUTOENCODER_FILE, CTAutoencoder, VAEConfig, load_text2ct_autoencoder, "vae"),
            (UNET_FILE, DiffusionUNet, DiffusionUNetConfig, load_text2ct_unet, "unet"),
            (CLIP3D_FILE, CLIP3D, CLIP3DConfig, load_text2ct_clip3d, "clip3d"))
    for file_name, model_class, config_class, loader, sub in jobs:
        if not (directory / file_name).is_file():
            raise UserError(f"'{directory}' has no {file_name} (Text2CT's public weights, dmolino/text2ct-weights).")
        with torch.device("meta"):
            model = model_class(config_class.paper())
        loader(directory / file_name, model, allow_pickle=allow_pickle, assign=True)
        model.after_load("cpu")
        model.save_pretrained(out_dir / sub, half=False)
    return out_dir
