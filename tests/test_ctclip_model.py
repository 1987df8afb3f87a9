"""CT-CLIP model: demo preset end to end, exact heat-map decomposition, assets round trip, frozen codebook, and the
CT-ViT's building blocks against explicit computations."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.models.ctclip import CTCLIP, CTCLIPConfig
from engine.models.ctvit import Attention, ContinuousPositionBias, CTViT, CTViTConfig, Patchify
from engine.errors import UserError
from engine.models.losses import symmetric_infonce
from tests.tiny_models import tiny_ctclip_config

ASSETS = Path(__file__).resolve().parents[1] / "assets"
REPORTS = [
    "Bilateral pleural effusion is present. The heart is enlarged.",
    "No pleural effusion. Lung parenchyma is normal.",
]


def tiny_config(**changes) -> CTCLIPConfig:
    """The tests' tiny CT CLIP with a random small BERT (tests/tiny_models.py)."""
    return tiny_ctclip_config(small_text=True, **changes)


def volume(config: CTCLIPConfig, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 1, *config.vision.input_shape, generator=g) * 0.5).clamp(-1, 1)


@pytest.fixture(scope="module")
def demo_model() -> CTCLIP:
    torch.manual_seed(0)
    return CTCLIP.build(CTCLIPConfig.demo(), pretrained_text=True)


# ------------------------------------------------------------------------------------------------ demo preset


def test_demo_config_is_explicit_and_small(demo_model):
    c = demo_model.config
    assert c.vision.input_shape == (64, 128, 128) and c.vision.grid == (8, 8, 8)
    assert c.vision.use_vq is False and demo_model.visual_transformer.vq is None
    assert c.text.hidden_size == 384 and c.text.max_length == 512
    assert not hasattr(demo_model, "to_visual_latent_extra")
    assert demo_model.to_visual_latent.weight.shape == (c.latent_dim, 8 * 8 * c.vision.dim)
    assert sum(p.numel() for p in demo_model.parameters()) < 40e6


def test_patch_density_input_counts_voxels_above_each_threshold():
    """Half of every patch at -1000 HU (air), a quarter at 10 HU (fluid), a quarter at 45 HU (soft tissue)."""
    from engine.models.ctvit import PatchDensityEmbedding
    emb = PatchDensityEmbedding((-950.0, 25.0, 100.0), 1000.0, pt=4, p=8, dim=8)
    row = torch.tensor([-1000.0] * 4 + [10.0] * 2 + [45.0] * 2)           # one patch width along x
    hu = row.repeat(2).expand(2, 1, 8, 16, 16).clone()
    frac = emb.fractions(hu / 1000.0)
    assert frac.shape == (2, 2, 2, 2, 3)
    torch.testing.assert_close(frac[..., 0], torch.full((2, 2, 2, 2), 0.5), atol=0.01, rtol=0)  # soft step
    torch.testing.assert_close(frac[..., 1], torch.full((2, 2, 2, 2), 0.25), atol=0.03, rtol=0)  # soft step
    assert frac[..., 2].max() < 0.01
    # the official preset has no such input (its state dict must match CT-CLIP_v2.pt)
    assert CTCLIPConfig.paper().vision.patch_hu_edges == () and CTCLIPConfig.demo().vision.patch_hu_edges


def test_log_share_channels_make_a_one_percent_voxel_class_visible():
    """One patch of lung at -870 HU, another with 1 % of its voxels at -990 HU (emphysema-like): the linear share
    below -950 differs by 0.01, the log-share input by more than 2 units. log_proj starts at zero (a no-op)."""
    from engine.models.ctvit import PatchDensityEmbedding
    emb = PatchDensityEmbedding((-950.0,), 1000.0, pt=4, p=8, dim=4, log_share=True)
    hu = torch.full((1, 1, 4, 8, 16), -870.0)
    flat = hu[0, 0, :, :, 8:].reshape(-1)
    flat[:3] = -990.0                                                     # 3 of 256 voxels: 1.2 %
    hu[0, 0, :, :, 8:] = flat.reshape(4, 8, 8)
    above = emb.fractions(hu / 1000.0)[0, 0, 0, :, 0]
    assert abs(float(above[0] - above[1]) - 3 / 256) < 2e-3
    log_below = torch.log(1.0 - above + emb.LOG_FLOOR)
    assert float(log_below[1] - log_below[0]) > 2.0
    assert torch.count_nonzero(emb.log_proj.weight) == 0 and torch.count_nonzero(emb.log_proj.bias) == 0
    torch.testing.assert_close(emb(hu / 1000.0), emb.proj(emb.fractions(hu / 1000.0)))
    emb.log_proj.weight.data.fill_(1.0)                                   # once trained, the channels count
    assert not torch.allclose(emb(hu / 1000.0), emb.proj(emb.fractions(hu / 1000.0)))


def test_demo_forward_backward(demo_model):
    model = demo_model.train()
    tokens = model.tokenize(REPORTS)
    vol = volume(model.config, 2)
    out = model(tokens["input_ids"], tokens["attention_mask"], vol)
    assert out.logits_per_text.shape == (2, 2)
    assert torch.equal(out.logits_per_image, out.logits_per_text.t())
    assert torch.allclose(out.text_latent.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(out.image_latent.norm(dim=-1), torch.ones(2), atol=1e-5)
    # symmetric InfoNCE, written out
    logits = model.logit_scale * out.text_latent @ out.image_latent.t()
    t2i = -torch.log_softmax(logits, dim=1).diagonal().mean()
    i2t = -torch.log_softmax(logits, dim=0).diagonal().mean()
    assert torch.isfinite(out.loss) and torch.allclose(out.loss, (t2i + i2t) / 2, atol=1e-6)
    model.zero_grad()
    out.loss.backward()
    for name in ("to_visual_latent.weight", "to_text_latent.weight", "temperature",
                 "visual_transformer.to_patch_emb.2.weight",
                 "visual_transformer.enc_spatial_transformer.layers.0.1.to_q.weight",
                 "text_transformer.encoder.layer.0.attention.self.query.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    model.eval()


def test_infonce_on_a_hand_worked_two_by_two_batch():
    """logits [[2, 0], [1, 3]]: rows (text -> image) give -log softmax at the diagonal = log(1 + e^-2) and
    log(1 + e^-2); columns (image -> text) give log(1 + e^-1) and log(1 + e^-3). Loss = the mean of the two means."""
    import math

    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    rows = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-2))) / 2
    columns = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-3))) / 2
    assert symmetric_infonce(logits).item() == pytest.approx((rows + columns) / 2, abs=1e-6)
    assert symmetric_infonce(logits.t()).item() == pytest.approx((rows + columns) / 2, abs=1e-6)
    # not symmetric in the off-diagonal alone: moving mass off the diagonal raises the loss
    assert symmetric_infonce(torch.tensor([[2.0, 1.0], [1.0, 3.0]])) > symmetric_infonce(logits)


def test_forward_loss_is_infonce_of_its_own_logits():
    model = CTCLIP(tiny_config()).eval()
    tokens = model.tokenize(REPORTS + ["Emphysema."])
    with torch.no_grad():
        out = model(tokens["input_ids"], tokens["attention_mask"], volume(model.config, 3))
    scale = float(model.logit_scale.detach())
    assert torch.allclose(out.logits_per_text, scale * out.text_latent @ out.image_latent.t(), atol=1e-6)
    assert torch.allclose(out.loss, symmetric_infonce(out.logits_per_text))


def test_text_latent_ignores_padding(demo_model):
    """Padding to the batch's longest report (not to max_length) must not change a report's latent."""
    with torch.no_grad():
        alone = demo_model.encode_text(**demo_model.tokenize(REPORTS[1]))
        padded = demo_model.encode_text(**demo_model.tokenize(REPORTS))[1:]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_token_scores_sum_to_the_score(demo_model):
    vol = volume(demo_model.config, 2, seed=3)
    with torch.no_grad():
        tokens = demo_model.image_tokens(vol)
        image = demo_model.image_latent_from_tokens(tokens)
        text = demo_model.encode_text(**demo_model.tokenize(REPORTS))
        assert torch.allclose(image, demo_model.encode_image(vol), atol=1e-6)
        assert tokens.shape == (2, 8, 8, demo_model.config.vision.dim)
        paired = demo_model.token_scores(tokens, text)
        one_text = demo_model.token_scores(tokens, text[0])
        per_slab = demo_model.token_scores(demo_model.visual_transformer(vol), text[0])  # unpooled, as the app
    assert per_slab.shape == (2, 8, 8, 8)
    assert torch.allclose(per_slab.sum(dim=1), one_text, atol=1e-5)  # the depth shares add up to the (h, w) share
    assert paired.shape == (2, 8, 8)
    assert torch.allclose(paired.sum(dim=(1, 2)), (image * text).sum(-1), atol=1e-5)
    assert torch.allclose(one_text.sum(dim=(1, 2)), image @ text[0], atol=1e-5)
    assert paired.abs().std() > 0  # a real map, not a constant


def test_bad_volume_shape_is_a_user_error():
    model = CTCLIP(tiny_config())
    with pytest.raises(UserError):
        model.encode_image(torch.zeros(1, 1, 16, 32, 40))
    with pytest.raises(UserError):
        model.encode_image(torch.zeros(1, 1, 18, 32, 32))
    with pytest.raises(UserError):
        model.encode_image(torch.zeros(1, 16, 32, 32))


# ------------------------------------------------------------------------------------------------ assets


@pytest.mark.parametrize("half", [False, True])
def test_save_load_round_trip(tmp_path, half):
    torch.manual_seed(1)
    model = CTCLIP(tiny_config(use_vq=True, codebook_size=64)).eval()
    model.save_pretrained(tmp_path, half=half)
    assert (tmp_path / "tokenizer" / "tokenizer_config.json").is_file()
    loaded = CTCLIP.from_pretrained(tmp_path)
    assert loaded.config.text.tokenizer_path == str(tmp_path / "tokenizer")  # the folder's own copy
    assert not loaded.training and loaded.config == replace(
        model.config, text=replace(model.config.text, tokenizer_path=loaded.config.text.tokenizer_path))
    assert loaded.preprocessing == model.preprocessing  # written to preprocessing.json and read back
    assert json.loads((tmp_path / "preprocessing.json").read_text())["shape_zyx"] == [16, 32, 32]
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        expected = original[name]
        if half and expected.ndim >= 2 and ".vq." not in name:
            expected = expected.half().float()
        assert tensor.dtype == original[name].dtype and torch.equal(tensor, expected), name
    if not half:  # identical weights -> identical outputs
        tokens = loaded.tokenize(REPORTS)  # tokenizer read from the copied files
        vol = volume(model.config, 2)
        with torch.no_grad():
            a = model(tokens["input_ids"], tokens["attention_mask"], vol)
            b = loaded(tokens["input_ids"], tokens["attention_mask"], vol)
        assert torch.equal(a.logits_per_text, b.logits_per_text)


def test_from_pretrained_rejects_a_non_model_directory(tmp_path):
    with pytest.raises(UserError):
        CTCLIP.from_pretrained(tmp_path)


def test_loading_names_missing_and_unexpected_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    CTCLIP(tiny_config()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    save_file({k: v for k, v in state.items() if k != "to_text_latent.weight"}, str(weights))
    with pytest.raises(UserError, match=r"1 missing tensor\(s\) \(to_text_latent.weight\)"):
        CTCLIP.from_pretrained(tmp_path)
    save_file({**state, "stray.weight": torch.zeros(2)}, str(weights))
    with pytest.raises(UserError, match=r"1 unexpected tensor\(s\) \(stray.weight\)"):
        CTCLIP.from_pretrained(tmp_path)


def test_a_damaged_preprocessing_file_is_one_sentence(tmp_path):
    CTCLIP(tiny_config()).save_pretrained(tmp_path)
    (tmp_path / "preprocessing.json").write_text(json.dumps({"name": "x", "voxel_size": 3}))
    with pytest.raises(UserError, match="does not describe a preprocessing"):
        CTCLIP.from_pretrained(tmp_path)


def test_the_flat_config_layout_of_older_checkpoints_still_loads():
    """The config.json of the stage-3 checkpoint (shipped until stage 4; kept in tests/data) predates the vision/text
    split; it reads into the same nested config."""
    flat = json.loads((Path(__file__).parent / "data" / "flat_layout_ctclip_config.json").read_text())
    assert "vision_dim" in flat and "vision" not in flat
    config = CTCLIPConfig.from_dict(flat)
    assert config.vision.dim == flat["vision_dim"] == 192 and config.vision.input_shape == (64, 128, 128)
    assert config.vision.patch_hu_log_share and config.vision.official_decoder_heads is False
    assert config.text.architecture == flat["text_config"] and config.text.family == "bert"
    assert config.text.pretrained_tensors == tuple(flat["pretrained_text_tensors"])
    assert config.official_extra_projections is False and config.latent_dim == 256
    assert CTCLIPConfig.from_dict(config.to_dict()) == config  # and the nested layout round-trips
    with pytest.raises(UserError, match="no field"):
        CTCLIPConfig.from_dict({**config.to_dict(), "vision_width": 3})


def test_clip_text_family_tower(tmp_path):
    """The text tower is chosen by the text config: a CLIP text transformer (Text2CT's CLIP3D) in place of BERT."""
    from transformers import CLIPTextModel

    arch = dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=64, bos_token_id=101, eos_token_id=102, pad_token_id=0)
    torch.manual_seed(0)
    config = tiny_config()
    model = CTCLIP(replace(config, text=replace(config.text, family="clip", architecture=arch))).eval()
    assert isinstance(model.text_transformer, CLIPTextModel)
    tokens = model.tokenize(REPORTS)
    with torch.no_grad():
        latent = model.encode_text(**tokens)
        features = model.text_transformer(**tokens).pooler_output
    assert torch.allclose(latent, F.normalize(model.to_text_latent(features), dim=-1))
    model.save_pretrained(tmp_path, half=False)
    loaded = CTCLIP.from_pretrained(tmp_path)
    assert loaded.config.text.family == "clip"
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(**tokens), latent)


# ------------------------------------------------------------------------------------------------ quantiser


def test_eval_keeps_the_paper_sized_codebook_frozen():
    config = CTViTConfig(dim=512, input_shape=(20, 40, 40), patch_size=20, temporal_patch_size=10, spatial_depth=1,
                         temporal_depth=1, heads=8, dim_head=32, codebook_size=8192)
    torch.manual_seed(0)
    vit = CTViT(config)
    codebook = vit.vq._codebook
    assert codebook.embed.shape == (1, 8192, 512) and codebook.cluster_size.shape == (1, 8192)
    before = {k: v.clone() for k, v in codebook.state_dict().items()}
    x = torch.randn(2, 1, 20, 40, 40)
    vit.eval()
    with torch.no_grad():
        tokens, index = vit(x, return_indices=True)
    for k, v in codebook.state_dict().items():
        assert torch.equal(v, before[k]), k
    # eval output is exactly the nearest code (cosine) of each token
    assert tokens.shape == (2, 2, 2, 2, 512) and index.shape == (2, 2, 2, 2)
    assert torch.equal(tokens, codebook.embed[0][index])
    vit.train()
    vit(x)
    assert not torch.equal(codebook.embed, before["embed"])
    assert codebook.cluster_size.sum() > 0


# ------------------------------------------------------------------------------------------------ blocks


def test_sdpa_attention_equals_explicit_reference():
    torch.manual_seed(0)
    attn = Attention(dim=48, dim_head=16, heads=3)
    with torch.no_grad():
        for p in attn.parameters():
            if p.numel():
                p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 10, 48)
    bias = torch.randn(3, 10, 10)
    # explicit: keys/values from the raw input, queries from the normalised input, l2-normalised q/k, scale 8
    normed = F.layer_norm(x, (48,), attn.norm.gamma, attn.norm.beta)
    q = attn.to_q(normed).view(2, 10, 3, 16).transpose(1, 2)
    k, v = (t.view(2, 10, 3, 16).transpose(1, 2) for t in attn.to_kv(x).chunk(2, dim=-1))
    q = F.normalize(q, dim=-1) * attn.q_scale
    k = F.normalize(k, dim=-1) * attn.k_scale
    weights = (q @ k.transpose(-1, -2) * 8 + bias).softmax(dim=-1)
    expected = attn.to_out((weights @ v).transpose(1, 2).reshape(2, 10, 48))
    assert torch.allclose(attn(x, attn_bias=bias), expected, atol=1e-5)
    assert torch.allclose(attn(x), attn.to_out(((q @ k.transpose(-1, -2) * 8).softmax(-1) @ v)
                                               .transpose(1, 2).reshape(2, 10, 48)), atol=1e-5)
    assert attn.null_kv.shape == (3, 0, 16)


def test_position_bias_equals_pairwise_mlp():
    torch.manual_seed(0)
    cpb = ContinuousPositionBias(dim=16, heads=4)
    h, w = 3, 5
    grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
    rel = (grid[:, None] - grid[None, :]).float()
    rel = torch.sign(rel) * torch.log(rel.abs() + 1)
    for layer in cpb.net:
        rel = layer(rel)
    assert torch.allclose(cpb(h, w), rel.permute(2, 0, 1), atol=1e-6)


def test_patchify_order_matches_reference_rearrange():
    """b c (t pt) (h p1) (w p2) -> b t h w (c pt p1 p2)."""
    x = torch.randn(2, 2, 8, 12, 6)
    out = Patchify(pt=4, p=3)(x)
    assert out.shape == (2, 2, 4, 2, 2 * 4 * 3 * 3)
    b, t, h, w = 1, 1, 2, 1
    patch = x[b, :, t * 4:(t + 1) * 4, h * 3:(h + 1) * 3, w * 3:(w + 1) * 3]
    assert torch.equal(out[b, t, h, w], patch.reshape(-1))


def test_peg_is_causal_along_depth():
    """A change in the last slab of tokens cannot affect earlier slabs through the PEG of the spatial stage."""
    from engine.models.ctvit import PEG

    torch.manual_seed(0)
    peg = PEG(dim=4)
    b, t, h, w = 1, 3, 2, 2
    x = torch.randn(b * t, h * w, 4)
    y = x.clone()
    y.view(b, t, h * w, 4)[:, -1] += 1.0
    out_x, out_y = peg(x, (b, t, h, w)), peg(y, (b, t, h, w))
    assert torch.equal(out_x.view(b, t, -1)[:, :-1], out_y.view(b, t, -1)[:, :-1])
    assert not torch.equal(out_x, out_y)
