"""The generation pipeline end to end on a tiny generator (random weights: these tests check the machinery - geometry,
seeding, guidance algebra, schedulers, progress, cancel, bad inputs - not image quality), conditioned on and read by
a tiny CT CLIP saved and reloaded as the shipped one is."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from engine.errors import UserError
from engine.labels import LABELS
from engine.models.diffusion_unet import DiffusionUNet
from engine.models.vae import CTAutoencoder
from engine.pipelines.base import Cancelled, RunControl, make_generator
from engine.pipelines.ctclip import CTClipPipeline
from engine.pipelines.generate import (MAX_SEED, GeneratePipeline, check_guidance, check_seed, check_steps,
                                       guided_prediction, make_scheduler, noisy_latent_and_target,
                                       read_nifti_description, write_synthetic_nifti)
from engine.report_edit import toggle_finding
from engine.volume import read_ct
from tests.tiny_models import TINY_SHAPE, TINY_SPACING, tiny_ctclip_config, tiny_unet, tiny_unet_config, tiny_vae_config

REPORT = ("Findings: Moderate right pleural effusion. The heart is enlarged. "
          "Impression: Right pleural effusion. Cardiomegaly.")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """tiny CT CLIP folder, tiny generator folder (vae/ + unet/)."""
    from engine.models.ctclip import CTCLIP

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("gen")
    CTCLIP.build(tiny_ctclip_config()).save_pretrained(root / "ctclip")
    CTAutoencoder(tiny_vae_config()).save_pretrained(root / "generator" / "vae")
    tiny_unet().save_pretrained(root / "generator" / "unet")  # a context that matters: prompts differ
    return root


@pytest.fixture(scope="module")
def pipeline(folders):
    ctclip = CTClipPipeline.from_pretrained(folders / "ctclip")
    return GeneratePipeline.from_pretrained(folders / "generator", ctclip=ctclip)


def test_generates_a_volume_with_its_geometry_written_as_synthetic_nifti(pipeline, tmp_path):
    import SimpleITK as sitk

    seen = []
    result = pipeline.generate(REPORT, steps=3, seed=7, progress=lambda f, m: seen.append((f, m)))
    volume = result.volume
    assert volume.array.shape == TINY_SHAPE and volume.spacing == pytest.approx(TINY_SPACING)
    assert volume.array.min() >= -1000 and volume.array.max() <= 1000
    path = write_synthetic_nifti(volume, tmp_path / "synthetic.nii.gz")
    # an untrained generator draws no CT (read_ct rightly refuses it: no air, no body), so its file is checked
    # with SimpleITK here; the next test reopens the same path with read_ct on CT content
    image = sitk.ReadImage(str(path))
    assert image.GetSize() == (TINY_SHAPE[2], TINY_SHAPE[1], TINY_SHAPE[0])
    assert image.GetSpacing() == pytest.approx(TINY_SPACING, rel=1e-5)
    assert image.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert np.array_equal(sitk.GetArrayFromImage(image), volume.array)  # whole HU survive int16 exactly
    assert "SYNTHETIC" in read_nifti_description(path)
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    messages = " ".join(m for _, m in seen)
    assert "sampling step 3 of 3" in messages and "decoding" in messages


@pytest.mark.parametrize("axes", ["LPS-zyx", "RAS-xyz"])
def test_decoded_intensity_becomes_an_lps_volume_that_read_ct_reopens(folders, lung1_path, tmp_path, axes):
    """A real CT on the tiny grid, laid out in the network's axes as the decoder would give it, goes through
    to_volume and write_synthetic_nifti and comes back from read_ct in LPS with the stated spacing, voxel for voxel.
    RAS-xyz is Text2CT's layout (MONAI's NIfTI order after Orientation RAS: x and y reversed, axes (x, y, z))."""
    from engine.transforms import Preprocessing, prepare

    grid = Preprocessing("tiny", TINY_SPACING, TINY_SHAPE, out_range=(0.0, 1.0))
    _, unit = prepare(read_ct(lung1_path), grid)  # (1, z, y, x) LPS, intensity in [0, 1]
    network = unit if axes == "LPS-zyx" else torch.flip(unit, dims=(2, 3)).permute(0, 3, 2, 1)
    gen = GeneratePipeline(CTAutoencoder.from_pretrained(folders / "generator" / "vae"),
                           DiffusionUNet(tiny_unet_config(axes=axes)), lambda texts: None)
    volume = gen.to_volume(network[None])
    expected = np.rint(unit[0].numpy() * 2000 - 1000)
    assert np.array_equal(volume.array, expected)
    back = read_ct(write_synthetic_nifti(volume, tmp_path / f"{axes}.nii.gz"))
    assert back.spacing == pytest.approx(TINY_SPACING, rel=1e-5)
    assert back.direction == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    centre = np.array(back.origin) + (np.array(back.shape_xyz) - 1) * np.array(back.spacing) / 2
    assert centre == pytest.approx((0, 0, 0), abs=1e-3)  # centred on the scanner origin
    assert np.array_equal(back.array, expected)


def test_same_seed_same_volume_other_seed_other_volume(pipeline):
    a = pipeline.generate(REPORT, steps=2, seed=3).volume.array
    b = pipeline.generate(REPORT, steps=2, seed=3).volume.array
    c = pipeline.generate(REPORT, steps=2, seed=4).volume.array
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_batched_guidance_equals_two_separate_passes(pipeline):
    latent = torch.randn(1, 4, 4, 8, 8, generator=make_generator(0))
    context = torch.nn.functional.normalize(torch.randn(1, 1, 32), dim=-1)
    t = torch.tensor(640.0)
    with torch.inference_mode():
        batched = guided_prediction(pipeline.unet, latent, t, context, 5.0, batched=True)
        separate = guided_prediction(pipeline.unet, latent, t, context, 5.0, batched=False)
        cond = pipeline.unet(latent, t.reshape(1), context)
        uncond = pipeline.unet(latent, t.reshape(1), torch.zeros_like(context))
        at_one = guided_prediction(pipeline.unet, latent, t, context, 1.0)
        at_zero = guided_prediction(pipeline.unet, latent, t, context, 0.0)
    torch.testing.assert_close(batched, separate, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(at_one, cond, rtol=1e-4, atol=1e-5)   # w = 1: the conditional prediction
    torch.testing.assert_close(at_zero, uncond, rtol=1e-4, atol=1e-5)  # w = 0: the unconditional one


def test_rectified_flow_target_is_the_velocity_that_reaches_the_data():
    """x_t = (1 - t/T) x0 + (t/T) noise and target x0 - noise: one exact Euler step from t to 0 lands on x0."""
    config = tiny_unet_config()
    scheduler = make_scheduler(config, training=True)
    x0, noise = torch.randn(2, 4, 4, 8, 8), torch.randn(2, 4, 4, 8, 8)
    t = torch.tensor([250.0, 800.0])
    noisy, target = noisy_latent_and_target(scheduler, x0, noise, t, "velocity")
    torch.testing.assert_close(noisy[1], 0.2 * x0[1] + 0.8 * noise[1])
    torch.testing.assert_close(noisy + target * (t / 1000).view(2, 1, 1, 1, 1), x0)


def test_epsilon_option_samples_with_ddim_and_is_reproducible(folders):
    eps = GeneratePipeline(CTAutoencoder.from_pretrained(folders / "generator" / "vae"),
                           DiffusionUNet(tiny_unet_config(prediction="epsilon")),
                           lambda texts: np.ones((len(texts), 32), np.float32) / np.sqrt(32))
    scheduler = make_scheduler(eps.config, training=True)
    x0, noise = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 4, 4, 8, 8)
    _, target = noisy_latent_and_target(scheduler, x0, noise, torch.tensor([10]), "epsilon")
    assert torch.equal(target, noise)
    a = eps.generate(REPORT, steps=3, seed=1).volume.array
    assert np.array_equal(a, eps.generate(REPORT, steps=3, seed=1).volume.array)


def test_cancel_during_sampling_and_during_windowed_decoding(pipeline):
    calls = []

    def cancel_at_second_step():
        calls.append(1)
        return len(calls) > 2
    with pytest.raises(Cancelled):
        pipeline.generate(REPORT, steps=4, cancel=cancel_at_second_step)
    latent = torch.randn(1, 4, 4, 8, 8)
    windowed = GeneratePipeline(pipeline.vae, pipeline.unet, pipeline.encode_text, decode_window=(4, 4, 4))
    seen = []
    with torch.inference_mode():
        unit = windowed.decode(latent, RunControl(progress=lambda f, m: seen.append(m)))
    assert unit.shape == (1, 1, *TINY_SHAPE)
    assert any("decoding window 1 of" in m for m in seen) and len(seen) >= 3
    stop = []
    with pytest.raises(Cancelled), torch.inference_mode():
        windowed.decode(latent, RunControl(cancel=lambda: stop.append(1) or len(stop) > 1))


def test_an_autoencoder_that_names_a_decode_window_decodes_in_windows_of_it(pipeline):
    """A VAE whose config names a decode window (decode_window_zyx, voxels) decodes in gaussian-blended windows of it
    in latent voxels, exactly MONAI's sliding_window_inference at the pipeline's overlap; a window given to the
    pipeline wins; one without decodes a latent that fits whole (group norms over the whole volume, which differ from
    a window's: the outputs differ)."""
    from monai.inferers import sliding_window_inference

    from engine.pipelines.generate import DECODE_WINDOW_OVERLAP

    f = pipeline.vae.config.downsampling
    cropped = CTAutoencoder(replace(pipeline.vae.config, decode_window_zyx=(2 * f, 4 * f, 4 * f)))
    cropped.load_state_dict(pipeline.vae.state_dict())
    windowed = GeneratePipeline(cropped.eval(), pipeline.unet, pipeline.encode_text)
    assert windowed.decode_window == (2, 4, 4) and pipeline.decode_window is None
    assert GeneratePipeline(cropped, pipeline.unet, pipeline.encode_text, decode_window=(4, 4, 4)).decode_window == \
        (4, 4, 4)
    latent = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []
    with torch.inference_mode():
        unit = windowed.decode(latent, RunControl(progress=lambda f_, m: seen.append(m)))
        expected = sliding_window_inference(latent / windowed.config.scale_factor, (2, 4, 4), 1, cropped.decode,
                                            overlap=DECODE_WINDOW_OVERLAP, mode="gaussian")
        whole = pipeline.decode(latent)
    assert any(m.startswith("decoding window 1 of") for m in seen)
    torch.testing.assert_close(unit, expected)
    assert not torch.allclose(unit, whole, atol=1e-3)


def test_compare_finding_is_the_same_seed_with_and_without_the_finding(pipeline):
    """REPORT states no emphysema: the toggle adds it. The prompt's volume is exactly the one `generate` makes from
    the same seed; the difference is with - without, voxel for voxel, and not zero (the text latents differ)."""
    seen = []
    comparison = pipeline.compare_finding(REPORT, "emphysema", steps=2, seed=5,
                                          progress=lambda f, m: seen.append((f, m)))
    assert comparison.label == "Emphysema" and comparison.added
    assert comparison.prompt is comparison.without_finding and comparison.toggled is comparison.with_finding
    assert comparison.with_finding.text == toggle_finding(REPORT, "Emphysema").text
    alone = pipeline.generate(REPORT, steps=2, seed=5)
    assert np.array_equal(comparison.without_finding.volume.array, alone.volume.array)
    assert np.array_equal(comparison.difference_hu,
                          comparison.with_finding.volume.array - comparison.without_finding.volume.array)
    assert np.abs(comparison.difference_hu).max() > 0
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(m.startswith("the prompt: sampling step") for _, m in seen)
    assert any(m.startswith("with Emphysema: decoding") for _, m in seen)
    # the prompt's own generation handed back in: reused (no "the prompt" steps), the same pair
    seen.clear()
    again = pipeline.compare_finding(REPORT, "Emphysema", steps=2, seed=5, base=alone,
                                     progress=lambda f, m: seen.append((f, m)))
    assert again.without_finding is alone and not any(m.startswith("the prompt") for _, m in seen)
    assert np.array_equal(again.difference_hu, comparison.difference_hu)
    # a base of another request (other seed) is not reused
    other = pipeline.compare_finding(REPORT, "Emphysema", steps=2, seed=5, base=pipeline.generate(REPORT, steps=2,
                                                                                               seed=6))
    assert np.array_equal(other.without_finding.volume.array, alone.volume.array)


def test_compare_finding_removes_a_stated_finding_and_reads_both(pipeline):
    comparison = pipeline.compare_finding(REPORT, "Cardiomegaly", steps=1, seed=0)
    assert not comparison.added and comparison.prompt is comparison.with_finding
    assert "enlarged" not in comparison.without_finding.text.lower()
    readings = pipeline.read_comparison(comparison)
    for key in ("with_finding", "without_finding"):
        generation = getattr(comparison, key)
        reading = pipeline.read(generation.volume, generation.text_latent)
        assert readings[key] == {"found": reading["findings"]["Cardiomegaly"],
                                 "asked": reading["asked"]["Cardiomegaly"]}
        assert 0.0 <= readings[key]["found"] <= 1.0
    with pytest.raises(UserError, match="18 labels"):
        pipeline.compare_finding(REPORT, "Pneumothorax", steps=1)


@pytest.mark.parametrize("seed", [MAX_SEED + 1, -MAX_SEED - 1, 1.5, "seven", float("nan"), float("inf")])
def test_bad_seed_is_one_sentence(seed):
    with pytest.raises(UserError, match="seed"):
        check_seed(seed)


@pytest.mark.parametrize("steps", [0, 10_000, 2.5, "x"])
def test_bad_steps_are_one_sentence(steps):
    with pytest.raises(UserError, match="between 1 and"):
        check_steps(steps)


@pytest.mark.parametrize("guidance", [-0.5, 1e6, float("nan"), float("inf"), "strong"])
def test_bad_guidance_is_one_sentence(guidance):
    with pytest.raises(UserError, match="guidance"):
        check_guidance(guidance)


def test_cli_generate_end_to_end_and_bad_inputs(folders, tmp_path):
    env = {**os.environ, "CT_CTCLIP_DIR": str(folders / "ctclip"), "CT_GENERATOR_DIR": str(folders / "generator"),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    out = tmp_path / "gen.nii.gz"
    run = subprocess.run([sys.executable, "-m", "engine", "generate", "--text", REPORT, "--out", str(out),
                          "--steps", "2", "--seed", "5", "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    answer = json.loads(run.stdout)
    assert answer["path"] == str(out.resolve()) and answer["synthetic"] is True
    assert answer["shape"] == [TINY_SHAPE[2], TINY_SHAPE[1], TINY_SHAPE[0]]
    assert answer["spacing"] == pytest.approx(TINY_SPACING, rel=1e-5)
    assert set(answer["findings"]) == set(LABELS) == set(answer["asked"])
    assert all(0.0 <= p <= 1.0 for p in answer["findings"].values())
    from engine.cli import main
    for argv in (["--text", "   "], ["--text", "effusion " * 6000], ["--text", REPORT, "--steps", "0"],
                 ["--text", REPORT, "--steps", "10000"], ["--text", REPORT, "--guidance", "-1"],
                 ["--text", REPORT, "--guidance", "1e9"], ["--text", REPORT, "--seed", str(2**70)],
                 ["--text", REPORT, "--toggle", "Pneumothorax"]):
        assert main(["generate", *argv, "--out", str(tmp_path / "x.nii.gz"), "--json"]) == 2
    assert not (tmp_path / "x.nii.gz").exists()


def test_cli_generate_toggle_writes_both_volumes_and_keeps_the_contract(folders, tmp_path):
    """--toggle: the answer's top level is the prompt's generation as without it (same keys, same file content for
    the same seed), plus "toggle" with the toggled prompt's volume beside --out."""
    env = {**os.environ, "CT_CTCLIP_DIR": str(folders / "ctclip"), "CT_GENERATOR_DIR": str(folders / "generator"),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    out = tmp_path / "pair.nii.gz"
    run = subprocess.run([sys.executable, "-m", "engine", "generate", "--text", REPORT, "--out", str(out),
                          "--steps", "2", "--seed", "5", "--toggle", "pleural effusion", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    answer = json.loads(run.stdout)
    assert {"path", "shape", "spacing", "elapsed_s", "findings", "asked", "synthetic"} <= set(answer)
    toggle = answer["toggle"]
    assert toggle["label"] == "Pleural effusion" and toggle["added"] is False  # REPORT states it: removed
    assert toggle["path"] == str((tmp_path / "pair_without_pleural_effusion.nii.gz").resolve())
    assert toggle["text"] == toggle_finding(REPORT, "Pleural effusion").text
    assert set(toggle["findings"]) == set(LABELS) == set(toggle["asked"])
    import SimpleITK as sitk

    prompt, toggled = (sitk.GetArrayFromImage(sitk.ReadImage(p)) for p in (answer["path"], toggle["path"]))
    assert "SYNTHETIC" in read_nifti_description(toggle["path"])
    difference = np.abs(prompt.astype(np.float32) - toggled)  # with - without, the prompt being "with"
    assert toggle["difference_hu"]["mean_abs"] == pytest.approx(float(difference.mean()), abs=1e-3)
    assert toggle["difference_hu"]["max_abs"] == pytest.approx(float(difference.max()), abs=1e-3)


def test_missing_generator_says_how_to_train_it(tmp_path):
    with pytest.raises(UserError, match="python -m training vae --preset demo"):
        GeneratePipeline.from_pretrained(tmp_path, ctclip=object())


def _shipped_generator() -> bool:
    from engine.settings import generator_dir

    return (generator_dir() / "unet" / "config.json").is_file()


@pytest.mark.timeout(1800)
@pytest.mark.skipif(not _shipped_generator(), reason="needs the trained demo generator in assets/generator "
                    "(python -m training vae, ldm and ldm-export --preset demo), not shipped yet")
def test_shipped_generator_draws_a_finding_added_to_a_normal_report():
    """What one finding changes, on the shipped model: a visible finding added to a normal report, the same seed,
    raises the CT CLIP's zero-shot reading of that finding in the generated volume, on average over three findings
    the demo draws large (effusion, cardiomegaly, emphysema) and two seeds; the volumes differ where it was added."""
    pipeline = GeneratePipeline.from_pretrained()
    normal = "Findings: The lungs are clear. Heart size is normal. Impression: No acute findings."
    raised = []
    for seed in (0, 1):
        base = pipeline.generate(normal, seed=seed)
        for label in ("Pleural effusion", "Cardiomegaly", "Emphysema"):
            comparison = pipeline.compare_finding(normal, label, seed=seed, base=base)
            assert comparison.added and comparison.without_finding is base
            assert np.abs(comparison.difference_hu).mean() > 0
            readings = pipeline.read_comparison(comparison)
            raised.append(readings["with_finding"]["found"] - readings["without_finding"]["found"])
    assert np.mean(raised) > 0, raised
