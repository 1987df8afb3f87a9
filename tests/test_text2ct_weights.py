"""The paper presets of the generator against Text2CT's official checkpoint manifests, on the meta device (no
download, no memory): every manifest name exists in our model with its shape, the loaders accept the official
layouts (raw / wrapped U-Net, `model.`-prefixed CLIP3D, DDP prefix), and a real-valued round trip on a small model of
the same classes loads exactly what was saved."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.convert.text2ct import (load_text2ct_autoencoder, load_text2ct_clip3d, load_text2ct_unet,
                                    split_unet_checkpoint)
from engine.errors import UserError
from engine.models.clip3d import CLIP3D, CLIP3DConfig
from engine.models.diffusion_unet import DiffusionUNet, DiffusionUNetConfig
from engine.models.vae import CTAutoencoder, VAEConfig

MANIFESTS = Path(__file__).resolve().parents[2] / "shared" / "manifests"


def manifest(name: str) -> dict:
    path = MANIFESTS / f"text2ct_{name}.json"
    if not path.is_file():
        pytest.fail(f"manifest not found at {path}")
    return json.loads(path.read_text())


def meta_state(entries: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """An official file as the manifest describes it, on the meta device."""
    return {prefix + name: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
            for name, (shape, dtype) in entries.items()}


def meta_model(model_class, config):
    with torch.device("meta"):
        return model_class(config)


@pytest.mark.parametrize("name, model_class, config_class", [
    ("autoencoder", CTAutoencoder, VAEConfig), ("unet", DiffusionUNet, DiffusionUNetConfig)])
def test_maisi_networks_have_every_manifest_entry(name, model_class, config_class):
    entries = manifest(name)
    own = {k: list(v.shape) for k, v in meta_model(model_class, config_class.paper()).network.state_dict().items()}
    assert set(own) == set(entries)
    assert all(own[k] == entries[k][0] for k in entries)


def test_unet_counts_match_the_published_parameter_total():
    counts = json.loads((MANIFESTS / "text2ct_unet.counts.json").read_text())
    model = meta_model(DiffusionUNet, DiffusionUNetConfig.paper())
    assert sum(p.numel() for p in model.network.parameters()) == counts["total_params"] == 217_659_524


def test_autoencoder_loader_accepts_the_official_file_and_a_ddp_prefix():
    model = meta_model(CTAutoencoder, VAEConfig.paper())
    report = load_text2ct_autoencoder(meta_state(manifest("autoencoder")), model, assign=True)
    assert report.ok and len(report.loaded) == 130 and not report.dropped
    model = meta_model(CTAutoencoder, VAEConfig.paper())
    report = load_text2ct_autoencoder(meta_state(manifest("autoencoder"), "module."), model, assign=True)
    assert len(report.renamed) == 130 and report.ok


def test_unet_loader_accepts_both_file_forms_and_takes_the_scale_factor():
    entries = manifest("unet")
    raw = meta_model(DiffusionUNet, DiffusionUNetConfig.paper())
    assert load_text2ct_unet(meta_state(entries), raw, assign=True).ok
    assert raw.config.scale_factor == pytest.approx(1.0287)  # a raw state dict keeps Text2CT's fallback
    wrapped = {"epoch": 199, "loss": 0.1, "num_train_timesteps": 1000, "scale_factor": torch.tensor(0.875),
               "unet_state_dict": meta_state(entries)}
    model = meta_model(DiffusionUNet, DiffusionUNetConfig.paper())
    report = load_text2ct_unet(wrapped, model, assign=True)
    assert report.ok and len(report.loaded) == 611
    assert model.config.scale_factor == pytest.approx(0.875)
    with pytest.raises(UserError):
        split_unet_checkpoint({"epoch": 3})


def test_clip3d_loader_strips_the_wrapper_and_drops_only_position_ids():
    entries = manifest("clip3d")
    model = meta_model(CLIP3D, CLIP3DConfig.paper())
    report = load_text2ct_clip3d(meta_state(entries), model, assign=True)
    assert report.ok
    assert set(report.dropped) == {"model.text_model.embeddings.position_ids"}
    assert len(report.loaded) == len(entries) - 1 == 356
    assert all(v == k.removeprefix("model.") for k, v in report.renamed.items())


def test_a_missing_or_misshaped_tensor_is_one_sentence_naming_it():
    entries = manifest("unet")
    state = meta_state(entries)
    state.pop("spacing_layer.0.weight")
    state["conv_in.conv.weight"] = torch.empty(64, 8, 3, 3, 3, device="meta")
    with pytest.raises(UserError, match="spacing_layer.0.weight") as err:
        load_text2ct_unet(state, meta_model(DiffusionUNet, DiffusionUNetConfig.paper()), assign=True)
    assert "shape mismatch" in str(err.value) and "\n" not in str(err.value)


def test_small_maisi_autoencoder_round_trips_real_values():
    """The same classes at a small size: saved values come back exactly (names unchanged by the loader)."""
    config = VAEConfig(channels=(8, 8, 16), num_res_blocks=(1, 1, 1), norm_num_groups=8, num_splits=1,
                       norm_float16=False)
    source = CTAutoencoder(config)
    state = {k: v.clone() for k, v in source.network.state_dict().items()}
    target = CTAutoencoder(config)
    load_text2ct_autoencoder(state, target)
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(source.encode(x), target.encode(x))
