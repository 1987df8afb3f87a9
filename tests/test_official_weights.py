"""The paper preset against the official CT-CLIP_v2.pt manifest, and the official-checkpoint loader.

Everything paper-sized is built on the meta device (no memory, no download); loader behaviour with real values is
checked on a small model with the paper's structure (VQ, decoder heads, *_extra projections)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.models.ctclip import CTCLIP, CTCLIPConfig
from engine.errors import UserError
from tests.tiny_models import tiny_ctclip_config
from engine.convert.ctclip import convert_official_ctclip, load_official_ctclip, map_official_ctclip, read_state_dict

MANIFESTS = Path(__file__).resolve().parents[2] / "shared" / "manifests"
POSITION_IDS = "text_transformer.embeddings.position_ids"
VQ = "visual_transformer.vq._codebook."


@pytest.fixture(scope="module")
def manifest() -> dict:
    path = MANIFESTS / "ctclip_v2.json"
    if not path.is_file():
        pytest.fail(f"manifest not found at {path}")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def counts() -> dict:
    return json.loads((MANIFESTS / "ctclip_v2.counts.json").read_text())


@pytest.fixture(scope="module")
def paper_meta() -> CTCLIP:
    with torch.device("meta"):
        return CTCLIP(CTCLIPConfig.paper())


def fake_official(manifest: dict, *, prefix: str = "", new_vq_layout: bool = False) -> dict:
    """A state dict shaped like CT-CLIP_v2.pt: meta tensors, except the quantiser buffers (real, the loader reads
    initted's value) and position_ids."""
    state = {}
    for name, (shape, dtype) in manifest.items():
        state[prefix + name] = torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
    state[prefix + POSITION_IDS] = torch.arange(512)[None]
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(1, 8192, 512, generator=g)
    cluster = torch.rand(1, 8192, generator=g)
    if new_vq_layout:  # newer vector-quantize-pytorch: 0-d bool flag, no codebook axis, extra EMA sum
        state[prefix + VQ + "initted"] = torch.tensor(True)
        state[prefix + VQ + "cluster_size"] = cluster[0]
        state[prefix + VQ + "embed"] = embed[0]
        state[prefix + VQ + "embed_avg"] = embed[0] * 2
    else:
        state[prefix + VQ + "initted"] = torch.ones(1)
        state[prefix + VQ + "cluster_size"] = cluster
        state[prefix + VQ + "embed"] = embed
    return state


# ------------------------------------------------------------------------------------------------ names and shapes


def test_paper_preset_matches_every_manifest_entry(paper_meta, manifest, counts):
    ours = paper_meta.state_dict()
    assert len(manifest) == counts["num_state_dict_entries"] == 362
    # the only official entry we do not have is the position_ids buffer newer transformers no longer persists
    assert set(manifest) - set(ours) == {POSITION_IDS}
    assert set(ours) - set(manifest) == set()
    for name, tensor in ours.items():
        shape, dtype = manifest[name]
        assert list(tensor.shape) == shape, name
        assert tensor.dtype == getattr(torch, dtype), name
    assert sum(p.numel() for p in paper_meta.parameters()) == counts["total_params"] == 438_148_761
    buffers = {n for n, _ in paper_meta.named_buffers() if n in ours}
    assert buffers == set(counts["buffers"]) - {POSITION_IDS}
    for prefix, c in counts["by_prefix"].items():
        params = sum(p.numel() for n, p in paper_meta.named_parameters() if n.split(".")[0] == prefix)
        assert params == c["params"], prefix


def test_paper_preset_config_matches_the_reference(counts):
    config = CTCLIPConfig.paper()
    ref = counts["configs"]
    assert config.text.architecture == ref["bert"] and config.text.family == "bert"
    vit = config.vision
    assert (vit.dim, vit.codebook_size, vit.image_size, vit.patch_size, vit.temporal_patch_size) == (
        ref["ctvit"]["dim"], ref["ctvit"]["codebook_size"], (ref["ctvit"]["image_size"],) * 2,
        ref["ctvit"]["patch_size"], ref["ctvit"]["temporal_patch_size"])
    assert (vit.spatial_depth, vit.temporal_depth, vit.dim_head, vit.heads) == (4, 4, 32, 8)
    assert vit.grid == (24, 24, 24)
    assert config.visual_dim == ref["ctclip"]["dim_image"] and config.latent_dim == ref["ctclip"]["dim_latent"]
    assert config.text.hidden_size == ref["ctclip"]["dim_text"] and config.text.max_length == 512


# ------------------------------------------------------------------------------------------------ loader on meta


@pytest.mark.parametrize("prefix,new_vq_layout", [("", False), ("module.", False), ("", True), ("module.", True)])
def test_loader_accepts_the_official_layouts(paper_meta, manifest, prefix, new_vq_layout):
    state = fake_official(manifest, prefix=prefix, new_vq_layout=new_vq_layout)
    expected = paper_meta.state_dict()
    mapped, report = map_official_ctclip(state, expected)
    assert report.ok, report.summary()
    assert set(mapped) == set(expected) and len(report.loaded) == 361
    assert prefix + POSITION_IDS in report.dropped
    assert (prefix + VQ + "embed_avg" in report.dropped) == new_vq_layout
    if prefix:
        assert report.renamed["module.temperature"] == "temperature"
    for name, tensor in mapped.items():
        assert tensor.shape == expected[name].shape and tensor.dtype == expected[name].dtype, name
    assert torch.equal(mapped[VQ + "initted"], torch.ones(1))
    assert mapped[VQ + "embed"].shape == (1, 8192, 512)
    assert torch.equal(mapped[VQ + "embed"][0], state[prefix + VQ + "embed"].reshape(8192, 512))
    # and the real loader call (meta model, tensors assigned as they are)
    report = load_official_ctclip(state, paper_meta, assign=True)
    assert report.ok and torch.equal(paper_meta.visual_transformer.vq._codebook.embed, mapped[VQ + "embed"])


def test_loader_can_drop_the_unused_modules(manifest):
    config = CTCLIPConfig.paper()
    config.official_extra_projections = config.vision.official_decoder_heads = False
    with torch.device("meta"):
        model = CTCLIP(config)
    mapped, report = map_official_ctclip(fake_official(manifest), model.state_dict())
    assert report.ok, report.summary()
    assert "to_visual_latent_extra.weight" in report.dropped and "to_text_latent_extra.weight" in report.dropped
    assert "visual_transformer.to_pixels.0.weight" in report.dropped
    assert "visual_transformer.to_patch_emb_first_frame.2.weight" in report.dropped
    unused = 150_994_944 + 393_216 + 207_136 + 205_200 + 2_052_000  # *_extra + decoder heads (manifest counts)
    assert sum(p.numel() for p in model.parameters()) == 438_148_761 - unused


def test_loader_reports_missing_and_mismatched_keys(paper_meta, manifest):
    state = fake_official(manifest)
    del state["to_text_latent.weight"]
    state["temperature"] = torch.empty(2, device="meta")
    state["some.other.weight"] = torch.empty(3, device="meta")
    _, report = map_official_ctclip(state, paper_meta.state_dict())
    assert set(report.missing) == {"to_text_latent.weight", "temperature"}
    assert "temperature" in report.mismatched and report.unexpected == ["some.other.weight"]
    with pytest.raises(UserError, match="missing"):
        load_official_ctclip(state, paper_meta, assign=True)


# ------------------------------------------------------------------------------------------------ real values


def small_official_model() -> CTCLIP:
    """Paper structure (VQ, decoder heads, extra projections, no density input) at toy size: the tests' tiny config
    (tests/tiny_models.py) with the paper's optional parts switched on."""
    config = tiny_ctclip_config(small_text=True, input_shape=(20, 40, 40), patch_size=20, temporal_patch_size=10,
                                use_vq=True, codebook_size=64, official_unused_modules=True, patch_hu_edges=(),
                                max_length=32, latent_dim=16)
    return CTCLIP(config).eval()


def test_official_file_round_trip_with_real_values(tmp_path):
    torch.manual_seed(0)
    source = small_official_model()
    official = {"module." + k: v.clone() for k, v in source.state_dict().items()}
    official["module." + POSITION_IDS] = torch.arange(512)[None]
    official["module." + VQ + "initted"] = torch.tensor(True)  # newer layout for the codebook
    official["module." + VQ + "embed"] = official["module." + VQ + "embed"][0].clone()
    official["module." + VQ + "embed_avg"] = torch.zeros(64, 32)
    path = tmp_path / "CT-CLIP_v2.pt"
    torch.save(official, path)

    torch.manual_seed(1)
    target = small_official_model()
    report = load_official_ctclip(path, target)
    assert report.ok, report.summary()
    for name, tensor in target.state_dict().items():
        assert torch.equal(tensor, source.state_dict()[name]), name
    vol = torch.randn(1, 1, 20, 40, 40).clamp(-1, 1)
    with torch.no_grad():
        assert torch.equal(source.encode_image(vol), target.encode_image(vol))

    # one-time conversion to safetensors, then the ordinary loader
    out = convert_official_ctclip(path, tmp_path / "converted", config=source.config)
    converted = CTCLIP.from_pretrained(out)
    assert not hasattr(converted, "to_visual_latent_extra")
    assert not hasattr(converted.visual_transformer, "to_pixels")
    for name, tensor in converted.state_dict().items():
        assert torch.equal(tensor, source.state_dict()[name]), name
    with torch.no_grad():  # same weights; memory layout of the loaded tensors may change the last float bit
        assert torch.allclose(source.encode_image(vol), converted.encode_image(vol), atol=1e-6)


class NotATensor:  # makes a pickle that weights_only loading refuses
    def __init__(self):
        self.note = "arbitrary object"


def test_pickles_needing_code_are_refused_unless_allowed(tmp_path):
    path = tmp_path / "suspicious.pt"
    torch.save({"model": {"temperature": torch.tensor(1.0)}, "extra": NotATensor()}, path)
    with pytest.raises(UserError, match="allow_pickle=True"):
        read_state_dict(path)
    state = read_state_dict(path, allow_pickle=True)
    assert set(state) == {"temperature"}
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError):
        read_state_dict(tmp_path / "garbage.pt")
    with pytest.raises(UserError):
        read_state_dict(tmp_path / "absent.pt")
