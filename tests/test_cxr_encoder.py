"""The CXR encoder (X2CT-CLIP): paper architecture, exact class-activation shares, checkpoint round trip, the one
radiograph -> tensor path on a real radiograph, and the tri-modal loss on a hand-worked case."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.models.cxr_encoder import CXREncoder, CXREncoderConfig
from engine.radiograph import read_radiograph

ROOT = Path(__file__).resolve().parents[1]
REAL_CXR = ROOT.parent / "shared" / "data" / "cxr" / "00000001_000.png"


def test_paper_preset_is_resnet50_on_224_with_a_512_latent():
    config = CXREncoderConfig.paper()
    assert (config.image_size, config.latent_dim, config.feature_dim) == (224, 512, 2048)
    with torch.device("meta"):
        model = CXREncoder(config)
    # torchvision's ResNet-50 without its fc: 23,508,032; one input channel (-2 x 64 x 7 x 7 = -6,272) and MONAI's
    # biased 1 x 1 downsampling convolutions (+256 + 512 + 1024 + 2048 = +3,840)
    assert sum(p.numel() for p in model.backbone.parameters()) == 23_508_032 - 6_272 + 3_840
    assert model.to_latent.weight.shape == (512, 2048) and model.to_latent.bias is None
    features = model.feature_map(torch.zeros(1, 1, 224, 224, device="meta"))
    assert tuple(features.shape) == (1, 2048, 7, 7)                 # stride 32, as ResNet-50


@pytest.mark.parametrize("backbone", ["resnet", "swin"])
def test_location_scores_sum_to_the_cosine_score(backbone):
    torch.manual_seed(0)
    model = CXREncoder(CXREncoderConfig.demo(latent_dim=32, backbone=backbone)).eval()
    images = torch.randn(2, 1, 128, 128)
    text = F.normalize(torch.randn(32), dim=0)
    with torch.no_grad():
        shares = model.location_scores(images, text)
        score = model.encode_image(images) @ text
    assert shares.ndim == 3 and shares.shape[0] == 2 and shares.shape[1] * shares.shape[2] > 1
    assert torch.allclose(shares.sum(dim=(1, 2)), score, atol=1e-5)
    assert shares.abs().max() < 1.0                                   # a share, not the whole score per location


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(1)
    model = CXREncoder(CXREncoderConfig.demo(latent_dim=64)).eval()
    images = torch.randn(3, 1, 128, 128)
    model.save_pretrained(tmp_path / "exact", half=False)
    model.save_pretrained(tmp_path / "half")
    with torch.no_grad():
        expected = model(images)
        exact = CXREncoder.from_pretrained(tmp_path / "exact")(images)
        half = CXREncoder.from_pretrained(tmp_path / "half")(images)
    assert torch.equal(exact, expected)
    assert (half * expected).sum(-1).min() > 0.999                   # float16 weights: the same direction
    assert CXREncoder.read_config(tmp_path / "exact") == model.config


def test_a_real_radiograph_becomes_a_standardised_square_input():
    model = CXREncoder(CXREncoderConfig.demo())
    radiograph = read_radiograph(REAL_CXR)
    tensor = model.prepare(radiograph)
    assert tuple(tensor.shape) == (1, 128, 128)
    h, w = radiograph.image.shape
    assert h == w or tensor[0, 0].std() < 1e-6 or tensor[0, :, 0].std() < 1e-6   # padding rows or columns if not square
    assert abs(float(tensor.mean())) < 0.5 and 0.5 < float(tensor.std()) < 1.5


def test_tri_modal_loss_on_a_hand_worked_batch():
    from training.train_x2ct import TriModalStep

    class Fixed(torch.nn.Module):              # an "encoder" that returns given latents
        def forward(self, images):
            return images

    b, tau = 4, 0.07
    latents = torch.eye(b)                     # orthonormal: cosine 1 on the diagonal, 0 elsewhere
    step = TriModalStep(Fixed(), alpha=0.0, beta=1.0, gamma=1.0, tau=tau)
    loss, logs = step(latents, latents, latents)
    one = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + (b - 1)))
    assert abs(float(loss) - 2 * one) < 1e-6
    assert abs(float(logs["loss_cxr_ct"]) - one) < 1e-6 and float(logs["batch_acc_cxr_ct"]) == 1.0
    only_ct = TriModalStep(Fixed(), alpha=0.0, beta=0.0, gamma=1.0, tau=tau)(latents, latents, latents.flip(0))[0]
    assert abs(float(only_ct) - one) < 1e-6    # beta = 0 (ablation): the report term is gone


def test_finding_term_is_the_bce_of_the_ct_clips_zero_shot_logits():
    """The finding term on 2 latents and 2 labels, worked by hand: prompt pairs whose present/absent latents differ by
    e0 and by e1 - e2, scale 10. Latent (1, 0, 0) reads logits 10 and 0 ; latent (0, 0.6, 0.8) reads 0 and -2."""
    from training.train_x2ct import TriModalStep

    class Fixed(torch.nn.Module):
        def forward(self, images):
            return images

    cxr = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    pairs = torch.zeros(2, 2, 3)
    pairs[0, 0, 0] = 1.0                               # label 0: present - absent = e0
    pairs[1, 0, 1], pairs[1, 1, 2] = 1.0, 1.0          # label 1: present - absent = e1 - e2
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    base = TriModalStep(Fixed(), alpha=0.0, beta=1.0, gamma=1.0, tau=0.07)
    step = TriModalStep(Fixed(), alpha=0.0, beta=1.0, gamma=1.0, tau=0.07, finding_weight=0.5,
                        prompt_latents=pairs, logit_scale=10.0)
    loss, logs = step(cxr, cxr, cxr, labels)

    def bce(logit, y):
        p = 1 / (1 + math.exp(-logit))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    expected = (bce(10, 1) + bce(0, 0) + bce(0, 0) + bce(-2, 1)) / 4
    assert abs(float(logs["loss_findings"]) - expected) < 1e-6
    assert abs(float(loss) - float(base(cxr, cxr, cxr)[0]) - 0.5 * expected) < 1e-6
    assert "finding_directions" not in step.state_dict()    # frozen data, not saved with the encoder's checkpoint
