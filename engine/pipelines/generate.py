"""The generation pipeline (Text2CT): type a report, get a synthetic CT volume with its geometry.

    report text -> CT-aligned text latent (demo: the demo CT CLIP's unit text latent, 256-d; paper: CLIP3D, 768-d)
        -> context (1, 1, D); the unconditional context is zeros (classifier-free guidance)
    Gaussian noise (the latent grid, seeded) -> N sampler steps, each ONE U-Net call on the batch
        [conditional, unconditional] and prediction = uncond + w * (cond - uncond)
        (rectified flow: Euler steps on the velocity x0 - noise; DDPM/DDIM: deterministic DDIM on epsilon)
    latent / scale_factor -> VAE decoder (in sliding windows when the latent is larger than the window)
        -> intensity [0, 1] -> HU [-1000, 1000] -> Volume ((z, y, x), LPS, spacing (x, y, z) mm, centred on the
        origin) -> NIfTI (int16 HU) whose header description says it is synthetic
The schedulers are MONAI's (RFlowScheduler: the one Text2CT's public U-Net was trained with, so its timestep
transform matches; DDPMScheduler / DDIMScheduler for the epsilon option); training (training/train_ldm.py) takes its
noising and targets from `make_scheduler` and `noisy_latent_and_target` here. Calls follow engine/pipelines/base.py:
seed (the ONLY randomness: a fixed seed reproduces a volume exactly), progress moving during sampling and decoding,
cancel between steps and between decoder windows.
What one finding changes (`compare_finding`): the prompt and the prompt with one finding toggled
(engine/report_edit.py) generated from the same seed, steps and guidance, with their HU difference; `read_comparison`
gives that finding's zero-shot probability in each volume and in each prompt's own text latent.
"""
from __future__ import annotations

import gzip
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from engine.errors import UserError
from engine.models.diffusion_unet import DiffusionUNet, DiffusionUNetConfig
from engine.models.vae import CTAutoencoder, unit_to_hu
from engine.pipelines.base import CancelSignal, ProgressCallback, RunControl, make_generator
from engine.query import check_query_text
from engine.volume import Volume, volume_to_image

DEFAULT_GUIDANCE = 5.0     # Text2CT's scale (its sweep 0..15 peaks at 5 for precision)
MAX_GUIDANCE = 30.0        # beyond this the guided prediction leaves the data range: not a sensible request
MAX_SEED = 2**63 - 1       # torch's generator takes a 64-bit seed
MAX_STEPS = 200            # a CPU generation at 200 steps is minutes; more only repeats what 200 do
SYNTHETIC_DESCRIPTION = "SYNTHETIC CT generated from text; not a patient"
DDIM_BETAS = dict(schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195)  # MAISI's DDPM betas
DECODE_WINDOW_OVERLAP = 0.4  # Text2CT decodes in gaussian-blended windows overlapping by 0.4

TextEncoder = Callable[[list[str]], np.ndarray]  # texts -> unit-norm text latents (N, D) float32


# ------------------------------------------------------------------------------------------------- schedulers

def make_scheduler(config: DiffusionUNetConfig, training: bool = False):
    """The MONAI scheduler of the config's prediction type: rectified flow (velocity) or DDPM (training) / DDIM
    (sampling) for epsilon."""
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

    if config.prediction == "velocity":  # Text2CT's code: continuous timesteps, size-dependent timestep shift
        return RFlowScheduler(num_train_timesteps=config.num_train_timesteps, use_discrete_timesteps=False,
                              use_timestep_transform=True, sample_method="uniform")
    if training:
        return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, clip_sample=False, **DDIM_BETAS)
    return DDIMScheduler(num_train_timesteps=config.num_train_timesteps, clip_sample=False, **DDIM_BETAS)


def sample_training_timesteps(scheduler, latent: torch.Tensor, generator: torch.Generator | None = None):
    """Timesteps (B,) for a training batch: the rectified-flow scheduler's own draw (uniform, then the same size
    transform as at sampling) or uniform integers for DDPM."""
    if hasattr(scheduler, "sample_timesteps"):
        return scheduler.sample_timesteps(latent)
    return torch.randint(0, scheduler.num_train_timesteps, (latent.shape[0],), generator=generator,
                         device=latent.device)


def noisy_latent_and_target(scheduler, latent: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                            prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy latent at `timesteps`, what the U-Net must predict): velocity x0 - noise (MONAI's rectified-flow
    convention, x_t = (1 - t/T) x0 + (t/T) noise) or the noise itself (epsilon)."""
    noisy = scheduler.add_noise(original_samples=latent, noise=noise, timesteps=timesteps)
    return noisy, (latent - noise if prediction == "velocity" else noise)


def guided_prediction(unet: DiffusionUNet, latent: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                      guidance: float, batched: bool = True) -> torch.Tensor:
    """Classifier-free guidance: uncond + w * (cond - uncond) for a (1, C, ...) latent and a (1, 1, D) context,
    the unconditional context being zeros. batched: ONE U-Net call on [cond, uncond] (the default; `batched=False`
    makes two calls, for the benchmark and the test that they agree)."""
    uncond = torch.zeros_like(context)
    t = timestep.reshape(1).to(latent.dtype)
    if batched:
        both = unet(torch.cat([latent, latent]), t.expand(2), torch.cat([context, uncond]))
        cond_out, uncond_out = both.chunk(2)
    else:
        cond_out, uncond_out = unet(latent, t, context), unet(latent, t, uncond)
    return uncond_out + guidance * (cond_out - uncond_out)


# ---------------------------------------------------------------------------------------------- the pipeline

@dataclass
class Generation:
    """One generated volume and how it was made."""

    volume: Volume                      # HU, (z, y, x), LPS, spacing (x, y, z) mm
    text: str
    text_latent: np.ndarray             # (D,) the conditioning latent
    steps: int
    guidance: float
    seed: int | None
    timings_s: dict = field(default_factory=dict)  # "text", "sampling", "decoding" seconds


@dataclass
class FindingComparison:
    """What one finding changes: the same seed, steps and guidance with and without `label` in the prompt."""

    label: str
    added: bool                         # True: the finding was added to the prompt as typed; False: removed
    with_finding: Generation
    without_finding: Generation
    difference_hu: np.ndarray           # with_finding - without_finding, HU, (z, y, x) float32

    @property
    def prompt(self) -> Generation:
        """The generation of the prompt as it was typed."""
        return self.without_finding if self.added else self.with_finding

    @property
    def toggled(self) -> Generation:
        """The generation of the prompt with the finding toggled."""
        return self.with_finding if self.added else self.without_finding


class GeneratePipeline:
    """Text -> synthetic CT. `encode_text` gives the conditioning latents; `reader` (a CTClipPipeline, optional)
    reads the generated volume and the prompt (zero-shot) for the check "does it show what was asked"."""

    def __init__(self, vae: CTAutoencoder, unet: DiffusionUNet, encode_text: TextEncoder, reader=None,
                 decode_window: tuple[int, ...] | None = None, model_id: str = "generator"):
        self.vae, self.unet = vae.eval(), unet.eval()
        self.encode_text = encode_text
        self.reader = reader
        # latent voxels per decoder window (network axes); None: the autoencoder's own (VAEConfig.decode_window_zyx)
        # if it names one, else decode whole when the latent fits and in 80^3 windows when not
        self.decode_window = decode_window or vae.config.latent_decode_window
        self.model_id = model_id

    @property
    def config(self) -> DiffusionUNetConfig:
        return self.unet.config

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, directory: str | Path | None = None, preset: str = "demo",
                        ctclip=None) -> "GeneratePipeline":
        """demo: DIR/vae and DIR/unet written by the trainers (default settings.generator_dir()), conditioned on
        and read by the demo CT CLIP (`ctclip`, default the shipped one). paper: DIR holds Text2CT's three
        official files (converted once into DIR/converted/) or the converted folders; conditioned on CLIP3D."""
        from engine.settings import generator_dir

        directory = Path(directory) if directory else generator_dir()
        if preset == "demo":
            if not ((directory / "unet" / "config.json").is_file() and (directory / "vae" / "config.json").is_file()):
                raise UserError(f"No trained generator in '{directory}': train one with 'python -m training vae "
                                "--preset demo' then 'python -m training ldm --preset demo'.")
            if ctclip is None:
                from engine.pipelines.ctclip import CTClipPipeline

                ctclip = CTClipPipeline.from_pretrained(preset="demo")
            vae = CTAutoencoder.from_pretrained(directory / "vae")
            unet = DiffusionUNet.from_pretrained(directory / "unet")
            if unet.config.context_encoder == "minilm-mean":  # the ablation: conditioned on a text encoder not
                from engine.models.text import SentenceMeanEncoder  # aligned with CT, still read by the CT CLIP

                return cls(vae, unet, SentenceMeanEncoder(), reader=ctclip, model_id=f"generator:{directory.name}")
            if unet.config.context_dim != ctclip.prompt_latents.shape[-1]:
                raise UserError(f"The generator in '{directory}' was trained with another CT CLIP (context size "
                                f"{unet.config.context_dim}); retrain it with 'python -m training ldm --preset demo'.")
            return cls(vae, unet, ctclip.embed_texts, reader=ctclip, model_id=f"generator:{directory.name}")
        if preset == "paper":
            return cls._paper(directory, ctclip)
        raise UserError(f"Unknown preset {preset!r}: use 'demo' or 'paper'.")

    @classmethod
    def _paper(cls, directory: Path, ctclip) -> "GeneratePipeline":
        from engine.convert.text2ct import UNET_FILE, convert_text2ct_directory
        from engine.models.clip3d import CLIP3D

        if not directory.is_dir():
            raise UserError(f"The weights folder '{directory}' does not exist.")
        target = directory if (directory / "unet" / "config.json").is_file() else directory / "converted"
        if not (target / "unet" / "config.json").is_file():
            if not (directory / UNET_FILE).is_file():
                raise UserError(f"'{directory}' holds neither Text2CT's official files nor converted folders.")
            convert_text2ct_directory(directory, target)
        clip3d = CLIP3D.from_pretrained(target / "clip3d")

        def encode(texts: list[str]) -> np.ndarray:
            with torch.inference_mode():
                tok = clip3d.tokenize(texts)
                return clip3d.encode_text(tok["input_ids"], tok["attention_mask"]).float().numpy()

        return cls(CTAutoencoder.from_pretrained(target / "vae"), DiffusionUNet.from_pretrained(target / "unet"),
                   encode, reader=ctclip, model_id="text2ct")

    # ----------------------------------------------------------------------------------------------- checking
    def check_request(self, text: str, steps: int | None, guidance: float) -> tuple[str, int, float]:
        """The prompt, steps and guidance checked (one sentence each when wrong), steps defaulted."""
        text = check_query_text(text)
        steps = self.config.default_steps if steps is None else steps
        return text, check_steps(steps), check_guidance(guidance)

    # --------------------------------------------------------------------------------------------- generating
    def generate(self, text: str, *, steps: int | None = None, guidance: float = DEFAULT_GUIDANCE,
                 seed: int | torch.Generator | None = None, progress: ProgressCallback | None = None,
                 cancel: CancelSignal | None = None) -> Generation:
        """A synthetic HU volume for a report. seed None = 0 (the pipeline convention): the same seed, prompt,
        steps and guidance give the same volume, voxel for voxel."""
        text, steps, guidance = self.check_request(text, steps, guidance)
        if seed is not None and not isinstance(seed, torch.Generator):
            seed = check_seed(seed)
        control = RunControl(progress, cancel)
        timings, started = {}, time.perf_counter()
        control.step(0.0, "reading the report")
        text_latent = np.asarray(self.encode_text([text])[0], dtype=np.float32)
        context = torch.from_numpy(text_latent).reshape(1, 1, -1)
        timings["text"] = time.perf_counter() - started
        generator = make_generator(seed)
        with torch.inference_mode():
            latent = self.sample(context, steps, guidance, generator, control, span=(0.05, 0.8))
            timings["sampling"] = time.perf_counter() - started - timings["text"]
            unit = self.decode(latent, control, span=(0.8, 0.98))
        timings["decoding"] = time.perf_counter() - started - timings["text"] - timings["sampling"]
        volume = self.to_volume(unit)
        control.step(1.0, "done")
        return Generation(volume, text, text_latent, steps, guidance, seed if isinstance(seed, int) else None,
                          {k: round(v, 4) for k, v in timings.items()})

    def compare_finding(self, text: str, label: str, *, steps: int | None = None,
                        guidance: float = DEFAULT_GUIDANCE, seed: int | None = None,
                        progress: ProgressCallback | None = None, cancel: CancelSignal | None = None,
                        base: Generation | None = None) -> FindingComparison:
        """The prompt and the prompt with `label` toggled (engine.report_edit.toggle_finding: added when the prompt
        does not state it, else removed), generated from the same seed (None = 0), steps and guidance, so the
        difference is the finding's. `base`: a Generation of this very request (same text, steps, guidance, seed),
        reused instead of generated again (a fixed seed reproduces a volume exactly). Progress spans both."""
        from engine.report_edit import toggle_finding

        text, steps, guidance = self.check_request(text, steps, guidance)
        seed = 0 if seed is None else check_seed(seed)
        toggled = toggle_finding(text, label)
        reuse = base is not None and (base.text, base.steps, base.guidance, base.seed) == (text, steps, guidance,
                                                                                          seed)
        first = base if reuse else self.generate(text, steps=steps, guidance=guidance, seed=seed,
                                                 progress=_sub_progress(progress, 0.0, 0.5, "the prompt"),
                                                 cancel=cancel)
        second = self.generate(toggled.text, steps=steps, guidance=guidance, seed=seed, cancel=cancel,
                               progress=_sub_progress(progress, 0.0 if reuse else 0.5, 1.0,
                                                      f"{'with' if toggled.added else 'without'} {toggled.label}"))
        with_finding, without_finding = (second, first) if toggled.added else (first, second)
        difference = with_finding.volume.array.astype(np.float32) - without_finding.volume.array.astype(np.float32)
        return FindingComparison(toggled.label, toggled.added, with_finding, without_finding, difference)

    def sample(self, context: torch.Tensor, steps: int, guidance: float, generator: torch.Generator,
               control: RunControl | None = None, span: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """Scaled latent (1, C, ...) from seeded noise in `steps` guided steps; progress moves across `span`."""
        control = control or RunControl()
        config = self.config
        latent = torch.randn((1, *config.latent_shape), generator=generator)
        scheduler = make_scheduler(config)
        if config.prediction == "velocity":
            scheduler.set_timesteps(steps, input_img_size_numel=int(np.prod(config.latent_shape[1:])))
        else:
            scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps
        following = torch.cat([timesteps[1:], torch.zeros_like(timesteps[:1])])
        lo, hi = span
        for i, (t, t_next) in enumerate(zip(timesteps, following)):
            control.step(lo + (hi - lo) * i / steps, f"sampling step {i + 1} of {steps}")
            prediction = guided_prediction(self.unet, latent, t.float(), context, guidance)
            if config.prediction == "velocity":
                latent, _ = scheduler.step(prediction, t, latent, t_next)
            else:
                latent, _ = scheduler.step(prediction, int(t), latent, generator=generator)
        return latent

    def decode(self, latent: torch.Tensor, control: RunControl | None = None,
               span: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """Scaled latent (1, C, ...) -> intensity (1, 1, ...) in the network's axes: whole, or in gaussian-blended
        sliding windows (MONAI's sliding_window_inference) when the latent is larger than the window (always, for
        an autoencoder whose config names a decode window)."""
        from monai.inferers import sliding_window_inference

        control = control or RunControl()
        latent = latent / self.config.scale_factor
        spatial = tuple(latent.shape[2:])
        window = tuple(self.decode_window or (80,) * len(spatial))
        if all(s <= w for s, w in zip(spatial, window)):
            control.step(span[0], "decoding the volume")
            return self.vae.decode(latent)
        window = tuple(min(s, w) for s, w in zip(spatial, window))
        total = math.prod(_windows_along(s, w, DECODE_WINDOW_OVERLAP) for s, w in zip(spatial, window))
        done = [0]

        def decode_window(part: torch.Tensor) -> torch.Tensor:
            control.step(span[0] + (span[1] - span[0]) * done[0] / total, f"decoding window {done[0] + 1} of {total}")
            done[0] += part.shape[0]
            return self.vae.decode(part)

        return sliding_window_inference(latent, window, 1, decode_window, overlap=DECODE_WINDOW_OVERLAP,
                                        mode="gaussian")

    def to_volume(self, unit: torch.Tensor) -> Volume:
        """Decoded intensity (1, 1, ...) in the network's axes -> HU Volume ((z, y, x), LPS, the config's spacing,
        centred on the origin so every viewer places it the same way)."""
        hu = unit_to_hu(unit[0, 0].float()).numpy()
        if self.config.axes == "RAS-xyz":  # MONAI's (x, y, z) after Orientation RAS -> (z, y, x), x and y reversed
            hu = np.transpose(hu, (2, 1, 0))[:, ::-1, ::-1]
        hu = np.ascontiguousarray(np.rint(hu), dtype=np.float32)
        spacing = tuple(float(s) for s in self.config.image_spacing)
        shape_xyz = hu.shape[::-1]
        origin = tuple(-(n - 1) * s / 2 for n, s in zip(shape_xyz, spacing))
        return Volume(hu, spacing, origin, source="synthetic")

    # ------------------------------------------------------------------------------------------------ reading
    def read(self, volume: Volume, text_latent: np.ndarray) -> dict[str, dict[str, float]] | None:
        """The CT CLIP's zero-shot reading of the generated volume ("findings") next to what the prompt states,
        read from its own text latent by the CT CLIP's text reader ("asked"); None without a reader. The prompt's
        reading is only meaningful when the reader is the CT CLIP that made the latent (the demo)."""
        if self.reader is None:
            return None
        findings = self.reader.zero_shot(volume)
        asked = self.reader.text_reading_from_latent(text_latent) if text_latent.shape[-1] == \
            self.reader.prompt_latents.shape[-1] else None
        return {"findings": findings, "asked": asked}

    def read_comparison(self, comparison: FindingComparison) -> dict[str, dict[str, float | None]] | None:
        """The compared label's zero-shot probability in each volume ("found") and in each prompt's own text latent
        ("asked"): {"with_finding": {"found", "asked"}, "without_finding": {...}}; None without a reader."""
        out = {}
        for key in ("with_finding", "without_finding"):
            generation = getattr(comparison, key)
            reading = self.read(generation.volume, generation.text_latent)
            if reading is None:
                return None
            asked = reading["asked"]
            out[key] = {"found": reading["findings"][comparison.label],
                        "asked": None if asked is None else asked[comparison.label]}
        return out


def _sub_progress(progress: ProgressCallback | None, lo: float, hi: float, what: str) -> ProgressCallback | None:
    """A progress callback for one part of a longer call: fractions mapped into [lo, hi], messages prefixed."""
    if progress is None:
        return None
    return lambda fraction, message: progress(lo + (hi - lo) * fraction, f"{what}: {message}")


def _windows_along(size: int, window: int, overlap: float) -> int:
    """How many windows MONAI's sliding window places along one axis (interval int(window * (1 - overlap)))."""
    if size <= window:
        return 1
    interval = max(1, int(window * (1 - overlap)))
    return math.ceil((size - window) / interval) + 1


def check_steps(steps) -> int:
    try:
        value = int(steps)
    except (TypeError, ValueError):
        raise UserError(f"--steps must be a whole number between 1 and {MAX_STEPS}, not {steps!r}.") from None
    if value != steps or not 1 <= value <= MAX_STEPS:
        raise UserError(f"--steps must be a whole number between 1 and {MAX_STEPS}, not {steps!r}.")
    return value


def check_seed(seed) -> int:
    """A seed is a whole number between -MAX_SEED and MAX_SEED (one sentence otherwise)."""
    try:
        value = int(seed)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"--seed must be a whole number, not {seed!r}.") from None
    if value != seed or abs(value) > MAX_SEED:
        raise UserError(f"--seed must be a whole number between -{MAX_SEED} and {MAX_SEED}, not {seed!r}.")
    return value


def check_guidance(guidance) -> float:
    try:
        value = float(guidance)
    except (TypeError, ValueError):
        raise UserError(f"--guidance must be a number between 0 and {MAX_GUIDANCE:g}, not {guidance!r}.") from None
    if not math.isfinite(value) or not 0.0 <= value <= MAX_GUIDANCE:
        raise UserError(f"--guidance must be a number between 0 and {MAX_GUIDANCE:g} (default "
                        f"{DEFAULT_GUIDANCE:g}), not {guidance!r}.")
    return value


# ------------------------------------------------------------------------------------------------- writing

def write_synthetic_nifti(volume: Volume, path: str | Path, description: str = SYNTHETIC_DESCRIPTION) -> Path:
    """The volume as int16 HU NIfTI with its geometry (SimpleITK's LPS -> the RAS qform/sform viewers read) and
    the NIfTI-1 header field `descrip` (80 bytes at offset 148) set to `description`. By hand because SimpleITK
    does not write `descrip`; the header is patched in an uncompressed file, then gzipped for .nii.gz."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise UserError(f"The output file must end in .nii.gz or .nii, not {path.name!r}.")
    if not path.parent.is_dir():
        raise UserError(f"The output folder {str(path.parent)!r} does not exist.")
    image = volume_to_image(Volume(np.clip(np.rint(volume.array), -32768, 32767), volume.spacing, volume.origin,
                                   volume.direction), np.int16)
    fd, plain = tempfile.mkstemp(suffix=".nii", dir=path.parent)
    os.close(fd)
    try:
        sitk.WriteImage(image, plain, useCompression=False)
        with open(plain, "r+b") as f:
            if int.from_bytes(f.read(4), "little") != 348:
                raise RuntimeError("SimpleITK wrote a header that is not NIfTI-1")
            f.seek(148)
            f.write(description.encode("ascii", "replace")[:79].ljust(80, b"\0"))
        if path.name.lower().endswith(".gz"):
            with open(plain, "rb") as src, gzip.open(path, "wb", compresslevel=6) as dst:
                shutil.copyfileobj(src, dst)
        else:
            os.replace(plain, path)
    finally:
        if os.path.exists(plain):
            os.remove(plain)
    return path


def read_nifti_description(path: str | Path) -> str:
    """The NIfTI-1 `descrip` header field of a file (.nii or .nii.gz)."""
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        header = f.read(348)
    return header[148:228].split(b"\0", 1)[0].decode("ascii", "replace")
