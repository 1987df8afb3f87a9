"""SpeechCT-CLIP training: a speech encoder joins the frozen CT CLIP's latent space.

    loss = symmetric InfoNCE(exp(t) * audio_latent @ ct_latent.T)            (audio <-> CT, frozen CT encoder)
         + distill_weight * mean(1 - cos(audio_latent, text_latent))          (frozen text teacher, the same report)
         + prompt_contrast_weight * CE(exp(t) * prompt_audio @ P.T, its prompt) (demo: spoken zero-shot prompts)
         + prompt_ct_logit_weight * mean((exp(t) * (prompt_audio - prompt_text) @ C.T)^2)  (demo: the same prompts)
with exp(t) the frozen CT CLIP's logit scale, so the speech latents live on the CT CLIP's own scale and its zero-shot
rule applies to them unchanged. `--no-distill` (distill_weight 0) is the paper's ablation. The third term is ours:
P holds the text latents of the 36 zero-shot prompts, and a spoken prompt must be nearer its own prompt's latent
than any other's, above all its negated twin ("X is present." / "X is not present." lie close in the text space,
and zero-shot reads only their difference, which the cosine distillation alone leaves to chance: at cosine 0.86 to
the teacher, the first shipped prompts read 0.815 on 300 test phantoms against the teacher's 0.932). The fourth term
is ours too: C holds the training studies' frozen CT latents, and a spoken prompt must score every one of them as its
prompt's text latent does (squared logit error): zero-shot reads a CT by exactly those scores, so this term spends
the head's capacity on the directions that CT latents occupy, where the cosine distillation spreads it over all of
the latent space (the CE term is met early, about 0.01 after 1,400 steps, and then stops pulling).

What is CT CLIP's here is frozen and cached: the teachers run in eval() once per study / text (their latents are
stored next to the data under the CT CLIP's model id, so a retrained CT CLIP recomputes them and retraining is the
same one command), and the Whisper layers below the trainable top are run once per window (their output, spoken
frames only in the demo, is cached in float16), so a training step runs only the top layers, the pooling and the
head. The loop (steps, time budget, checkpoint/resume, progress bar, torchrun) is training/loop.py.

Demo data (`training_phases`): phantom studies of training/ctclip_data.py's train split (held-out: its test split),
each with its generated report and short query, and the real CT-RATE reports (their phantoms from the demo CT CLIP's
own training cache; the acceptance test's six held out), read by espeak-ng (ESPEAK_TRAIN_VOICES: the phantom and the
real reports) and by a TRAIN_VOICES Kokoro voice at speed 0.9-1.1 (training/speech_data.py) within a CPU budget
(queries, then real reports, then phantom reports). Paper data (`--audio-dir`): audio files named by CT-RATE VolumeName
(VOLUME.wav / .flac, e.g. train_1_a_1.flac) with precomputed CT latents (`--ct-latents` safetensors keyed by
VolumeName, from the frozen CT-CLIP) and the reports CSV for the text teacher.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.models.losses import symmetric_infonce
from engine.models.speech_encoder import SpeechEncoder, SpeechEncoderConfig, Window
from engine.volume import DEMO_SHAPE_ZYX
from training.loop import LoopConfig, TrainingLoop


@dataclass
class SpeechTrainConfig:
    """A run: the model preset, the data plan and the loop's settings (LoopConfig fields by name)."""
    preset: str = "demo"
    distill_weight: float = 1.0          # lambda; 0 = the no-distillation ablation
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-4
    warmup_steps: int = 20
    schedule: str = "cosine"
    time_budget_s: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    ckpt_every: int = 200
    log_every: int = 10
    # demo data
    n_studies: int = 400                 # train-split phantom studies (report + query each)
    n_test_studies: int = 100            # test-split phantom studies for evaluation
    texts: tuple = ("query", "report")  # clips are made in this order (all queries, then reports) until the budget
    synthesis_budget_cpu_s: float = 3600.0
    espeak_train_texts: tuple = ("report",)  # also read these training texts with espeak-ng (ESPEAK_TRAIN_VOICES)
    # real CT-RATE reports: the first N rows of the CSV (the acceptance test's six held out: 794 of 800), each read
    # by espeak-ng and, within the Kokoro budget, by Kokoro; 0 = none
    n_real_studies: int = 800
    real_grid_zyx: tuple = DEMO_SHAPE_ZYX  # their phantoms' grid over the demo field of view (the CT CLIP's own:
    #                                        its training cache is reused; a smaller grid for cheap tests)
    # the 36 zero-shot prompts read by every training voice (Kokoro and espeak-ng), trained by distillation alone
    # (a prompt has no CT): spoken zero-shot asks exactly these sentences of the encoder, in unseen voices
    spoken_prompts: bool = True
    prompt_contrast_weight: float = 1.0  # the prompt term of the module docstring (0: distillation alone)
    prompt_ct_logit_weight: float = 0.5  # the CT-logit term of the module docstring (0: off, as shipped before it)
    # Kokoro's prompts also read by the 14 blended training voices (speech_data.BLENDED_TRAIN_VOICES: two training
    # voices' style vectors averaged), new speakers for the prompts without any evaluation voice
    blended_prompt_voices: bool = False
    lr_multipliers: dict = field(default_factory=lambda: {"whisper": 0.1, "to_latent": 1.0, "pool": 1.0})
    cpu_threads: int = 0                 # > 0: torch threads on CPU (1 is far faster on an oversubscribed machine)
    # paper data
    audio_dir: str = ""
    ct_latents: str = ""
    reports_csv: str = ""

    @classmethod
    def demo(cls) -> "SpeechTrainConfig":
        """The attention pooling and head train from scratch on the frozen, cached Whisper output: Adam 1e-3."""
        return cls(lr=1e-3, steps=4000)

    @classmethod
    def paper(cls) -> "SpeechTrainConfig":
        """SpeechCT-CLIP: Adam lr 1.25e-6, batch 8, 100k steps (one A100-80GB)."""
        return cls(preset="paper", steps=100_000, batch_size=8, lr=1.25e-6, warmup_steps=0, schedule="constant",
                   grad_clip=0.0, ckpt_every=1000, lr_multipliers={"whisper": 1.0, "to_latent": 1.0, "pool": 1.0})

    def model_config(self, latent_dim: int) -> SpeechEncoderConfig:
        cfg = SpeechEncoderConfig.demo(latent_dim) if self.preset == "demo" else SpeechEncoderConfig.paper()
        cfg.latent_dim = latent_dim
        return cfg


# ------------------------------------------------------------------------------------------------ cached features

class WhisperPrefixCache:
    """Output of the frozen Whisper layers per window (float16, (frames, d_model)), one safetensors file per clip,
    named by the clip's key and the encoder's frozen depth; made once."""

    def __init__(self, model: SpeechEncoder, root: Path):
        self.model, self.base = model, Path(root)
        self.root = self.folder(model.frozen_layers)
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, depth: int) -> Path:
        return self.base / f"whisper-{self.model.config.whisper.replace(':', '-')}-{depth}of" \
                           f"{len(self.model.whisper.layers)}"

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    @staticmethod
    def read(path: Path) -> list[tuple[torch.Tensor, int]]:
        from safetensors.torch import load_file

        state = load_file(str(path))
        return [(state[f"w{i}"], int(state[f"n{i}"])) for i in range(len(state) // 2)]

    def get(self, key: str, samples_fn) -> list[tuple[torch.Tensor, int]]:
        """[(hidden (frames, d) float16, spoken frames)] per window of the clip `key` (samples_fn() gives audio).
        A clip cached at a shallower depth (another trainable_layers) continues from there instead of the audio."""
        from safetensors.torch import save_file

        path = self.path(key)
        if path.is_file():
            return self.read(path)
        shallower = [(d, self.folder(d) / path.name) for d in range(self.model.frozen_layers - 1, 0, -1)]
        depth, start = next(((d, p) for d, p in shallower if p.is_file()), (0, None))
        state, out = {}, []
        with torch.inference_mode():
            if start is not None:
                cached = self.read(start)
                windows = [(Window(mel=torch.empty(0), spoken_frames=n), h.float()) for h, n in cached]
            else:
                windows = [(w, None) for w in self.model.windows(samples_fn())]
            for i, (window, below) in enumerate(windows):
                hidden = self.model.run_encoder(window, start_layer=depth, stop_layer=self.model.frozen_layers,
                                                hidden=below).half()
                state[f"w{i}"], state[f"n{i}"] = hidden.contiguous(), torch.tensor(window.spoken_frames)
                out.append((hidden, window.spoken_frames))
        save_file(state, str(path.with_suffix(".partial")))
        path.with_suffix(".partial").replace(path)
        return out


@dataclass
class SpeechItem:
    """One training pair: a clip (by key) with the frozen teachers' latents of its study and its text. paired False:
    a clip with no study (a spoken zero-shot prompt; study -1, ct_latent zeros): distillation only."""
    key: str
    study: int
    ct_latent: np.ndarray
    text_latent: np.ndarray
    paired: bool = True


class CachedWindows:
    """key -> the clip's cached windows [(hidden, spoken)], read from a WhisperPrefixCache when asked: the demo set's
    prefixes (float16, about 38 kB per second of speech: some 5 GB for 30 h of clips) stay on disk."""

    def __init__(self, prefixes: WhisperPrefixCache):
        self.prefixes = prefixes

    def __getitem__(self, key: str) -> list[tuple[torch.Tensor, int]]:
        return self.prefixes.read(self.prefixes.path(key))


class SpeechPairs(torch.utils.data.Dataset):
    """Items -> (windows [(hidden, spoken)], ct latent (D,), text latent (D,), paired), windows from the prefix cache
    (`windows`: a dict, or CachedWindows)."""

    def __init__(self, items: list[SpeechItem], windows):
        self.items, self.windows = items, windows

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        return (self.windows[item.key], torch.from_numpy(item.ct_latent), torch.from_numpy(item.text_latent),
                item.paired)


def collate(batch):
    windows, ct, text, paired = zip(*batch)
    return list(windows), torch.stack(ct), torch.stack(text), torch.tensor(paired, dtype=torch.bool)


def batch_inputs(device):
    """The loop's `inputs`: a collated batch -> SpeechStep's arguments on `device`."""
    return lambda batch: ((batch[0], batch[1].to(device), batch[2].to(device), batch[3].to(device)), {})


# ------------------------------------------------------------------------------------------------------ the step

class SpeechStep(nn.Module):
    """Loss of one batch from cached prefixes: the trainable Whisper top, pooling, head; frozen targets.
    `prompt_latents` (P, D): the text latents of the zero-shot prompts, for the prompt term; `ct_bank` (N, D): the
    training studies' CT latents, for the CT-logit term (module docstring)."""

    def __init__(self, model: SpeechEncoder, logit_scale: float, distill_weight: float,
                 prompt_latents: torch.Tensor | None = None, prompt_contrast_weight: float = 0.0,
                 ct_bank: torch.Tensor | None = None, prompt_ct_logit_weight: float = 0.0):
        super().__init__()
        self.model, self.distill_weight = model, distill_weight
        self.prompt_contrast_weight = prompt_contrast_weight if prompt_latents is not None else 0.0
        self.prompt_ct_logit_weight = prompt_ct_logit_weight if ct_bank is not None else 0.0
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        table = torch.zeros(0, 1) if prompt_latents is None else torch.as_tensor(prompt_latents, dtype=torch.float32)
        self.register_buffer("prompt_latents", table, persistent=False)   # frozen data, rebuilt each run
        bank = torch.zeros(0, 1) if ct_bank is None else torch.as_tensor(ct_bank, dtype=torch.float32)
        self.register_buffer("ct_bank", bank, persistent=False)           # frozen data, rebuilt each run

    def audio_latents(self, clips: list[list[tuple[torch.Tensor, int]]]) -> torch.Tensor:
        """(B, latent): per clip, each window from its cached prefix through the top layers, averaged."""
        latents = []
        for windows in clips:
            per_window = []
            for hidden, spoken in windows:
                window = Window(mel=torch.empty(0), spoken_frames=spoken)
                top = self.model.run_encoder(window, start_layer=self.model.frozen_layers, hidden=hidden.float().to(self.logit_scale.device))
                per_window.append(self.model.project(self.model.pool(top, window)))
            latents.append(self.model.average(torch.stack(per_window)))
        return torch.stack(latents)

    def forward(self, clips, ct_latents: torch.Tensor, text_latents: torch.Tensor, paired: torch.Tensor | None = None):
        """paired (B,) bool: rows with a study. The contrastive term runs over those rows only (a spoken prompt has
        no CT), the distillation over every row, the prompt term over the others (the spoken prompts: their text
        latent is a row of prompt_latents, which names the target)."""
        audio = self.audio_latents(clips)
        paired = torch.ones(len(audio), dtype=torch.bool, device=audio.device) if paired is None else paired
        if int(paired.sum()) >= 2:
            contrastive = symmetric_infonce(self.logit_scale * audio[paired] @ ct_latents[paired].t())
        else:
            contrastive = audio.new_zeros(())
        distill = (1.0 - (audio * text_latents).sum(-1)).mean()
        prompts = ~paired
        if self.prompt_contrast_weight > 0 and bool(prompts.any()):
            target = (text_latents[prompts] @ self.prompt_latents.t()).argmax(-1)
            logits = self.logit_scale * audio[prompts] @ self.prompt_latents.t()
            prompt_contrast = nn.functional.cross_entropy(logits, target)
        else:
            prompt_contrast = audio.new_zeros(())
        if self.prompt_ct_logit_weight > 0 and bool(prompts.any()):
            error = self.logit_scale * (audio[prompts] - text_latents[prompts]) @ self.ct_bank.t()
            prompt_ct_logit = error.pow(2).mean()
        else:
            prompt_ct_logit = audio.new_zeros(())
        loss = (contrastive + self.distill_weight * distill + self.prompt_contrast_weight * prompt_contrast
                + self.prompt_ct_logit_weight * prompt_ct_logit)
        return loss, {"contrastive": contrastive.detach(), "distill": distill.detach(),
                      "prompt_contrast": prompt_contrast.detach(), "prompt_ct_logit": prompt_ct_logit.detach()}


def make_optimizer_factory(model: SpeechEncoder, cfg: SpeechTrainConfig):
    """Adam over the trainable parameters; the pretrained Whisper top at lr_multipliers["whisper"] x the head's."""
    def make():
        groups = []
        for prefix, mult in cfg.lr_multipliers.items():
            params = [p for n, p in model.named_parameters() if n.startswith(prefix) and p.requires_grad]
            if params:
                groups.append({"params": params, "lr_mult": mult})
        return torch.optim.Adam(groups, lr=cfg.lr)
    return make


# ---------------------------------------------------------------------------------------------------------- data

def teacher_latents(pipeline, cache_path: Path, volumes_fn, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(CT latents (N, D), text latents (M, D)) of the frozen CT CLIP in eval(), cached in `cache_path` (named by the
    CT CLIP's model id, so a new CT CLIP computes its own)."""
    from safetensors.numpy import load_file, save_file
    from tqdm import tqdm

    if cache_path.is_file():
        cached = load_file(str(cache_path))
        if cached["text"].shape[0] == len(texts):
            return cached["ct"], cached["text"]
    pipeline.model.eval()
    ct = np.stack([pipeline.embed_volume(v) for v in tqdm(volumes_fn(), desc="CT latents (frozen)", unit="study")])
    text = pipeline.embed_texts(texts)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"ct": ct.astype(np.float32), "text": text.astype(np.float32)}, str(cache_path))
    return ct, text


def split_name(cfg: SpeechTrainConfig, split: str) -> str:
    """A split's plan in file names (its phantoms' folder, its teacher latents): "train-400", "test-100", "real-800"
    ("real-3-16x32x32" on another grid than the demo's)."""
    if split == "real":
        grid = tuple(int(v) for v in cfg.real_grid_zyx)
        return f"real-{cfg.n_real_studies}" + ("" if grid == DEMO_SHAPE_ZYX else "-" + "x".join(map(str, grid)))
    return f"{split}-{cfg.n_studies if split == 'train' else cfg.n_test_studies}"


def real_report_phantoms(cfg: SpeechTrainConfig, cache_root: Path, progress: bool = True, workers: int = 2):
    """PhantomCache of the real CT-RATE reports the speech training reads: the phantoms of the first
    cfg.n_real_studies rows of the report CSV (each rendered from its report's hand-set labels, training/
    ctclip_data.py), "real" records only, in row order, without the acceptance test's reports (eval_speech.
    held_out_report_texts, matched by text). With the demo CT CLIP's own plan (800 rows on its grid) they come from
    its training cache, cache/ctclip-demo/train (the volumes it trained on, rendered once for both, as training/
    train_vae.py does); another plan renders into cache_root/phantoms-real-N[-ZxYxX]."""
    from engine.errors import UserError
    from engine.settings import training_cache_dir
    from training.ctclip_data import (CachePlan, PhantomCache, build_cache, field_spacing_xyz, load_real_reports,
                                      real_reports_csv)
    from training.eval_speech import held_out_report_texts
    from training.train_ctclip import TrainConfig, demo_train_cache

    n_rows = len(load_real_reports())
    if not 0 < cfg.n_real_studies <= n_rows:
        raise UserError(f"--real-studies must be between 0 and {n_rows}, the real reports in {real_reports_csv()}.")
    ctclip = TrainConfig.demo()
    grid = tuple(int(v) for v in cfg.real_grid_zyx)
    if (cfg.n_real_studies, grid) == (ctclip.n_train_real, DEMO_SHAPE_ZYX):
        studies = demo_train_cache(ctclip, training_cache_dir() / "ctclip-demo", progress)
    else:
        plan = CachePlan("train", 0, cfg.n_real_studies, grid, field_spacing_xyz(grid))
        studies = PhantomCache(build_cache(cache_root / f"phantoms-{split_name(cfg, 'real')}", plan, workers=workers,
                                           progress=progress))
    held_out = held_out_report_texts()
    studies.records = [r for r in studies.records if r["kind"] == "real" and r["real_report"] not in held_out]
    return studies


def split_plan(cfg: SpeechTrainConfig, split: str, cache_root: Path, voices, engine: str = "kokoro",
               progress: bool = True, workers: int = 2) -> tuple:
    """(PhantomCache, texts [(study, kind, text)], clips aligned with texts) of one split read by `voices`: the ONE
    home of the clip plan, so `--synthesis-only`, training and evaluation ask for the same clips. "train" / "test":
    the phantom split rendered (or found) under cache_root, texts every study's cfg.texts in order (all queries
    first, then all reports); "real": real_report_phantoms, texts their real reports (kind "real_report")."""
    from training.ctclip_data import CachePlan, PhantomCache, build_cache
    from training.speech_data import plan_clips

    if split == "real":
        studies = real_report_phantoms(cfg, cache_root, progress=progress, workers=workers)
        texts = [(i, "real_report", rec["real_report"]) for i, rec in enumerate(studies.records)]
    else:
        n = cfg.n_studies if split == "train" else cfg.n_test_studies
        root = build_cache(cache_root / f"phantoms-{split_name(cfg, split)}", CachePlan(split=split, n_generated=n),
                           workers=workers, progress=progress)
        studies = PhantomCache(root)
        texts = [(i, kind, rec[kind]) for kind in cfg.texts for i, rec in enumerate(studies.records) if rec.get(kind)]
    seed = {"train": 1, "test": 2, "real": 3}[split] * 1000 + (0 if engine == "kokoro" else 500)
    return studies, texts, plan_clips([t for _, _, t in texts], voices, seed=seed, engine=engine)


def demo_split(cfg: SpeechTrainConfig, split: str, cache_root: Path, pipeline, voices, engine: str = "kokoro",
               budget_cpu_s: float | None = None, progress: bool = True) -> dict:
    """One split read aloud: {"items": [SpeechItem], "clips": {key: Clip}, "records": study records,
    "synthesis": what was made}. Only clips that exist (within the budget) become items; each item pairs its clip
    with the frozen CT CLIP's latent of its study's phantom and the CT CLIP's text latent of the text read."""
    from engine.volume import Volume
    from training.speech_data import SpeechSynthesizer, synthesize

    studies, texts, clips = split_plan(cfg, split, cache_root, voices, engine=engine, progress=progress)
    ct, text = teacher_latents(pipeline, cache_root / "teachers" / f"{pipeline.model_id}-{split_name(cfg, split)}"
                                                                   ".safetensors",
                               lambda: (Volume(array=studies.hu(i), spacing=studies.spacing_xyz)
                                        for i in range(len(studies))), [t for _, _, t in texts])
    synthesizer = SpeechSynthesizer(cache_root / "speech")
    report = synthesize(clips, synthesizer, budget_cpu_s, progress=progress)
    items = [SpeechItem(clip.key, study, ct[study], text[j]) for j, ((study, _, _), clip) in enumerate(zip(texts, clips))
             if synthesizer.path(clip).is_file()]
    return {"items": items, "clips": {c.key: c for c in clips}, "kinds": [k for _, k, _ in texts],
            "kind_of": {clip.key: kind for (_, kind, _), clip in zip(texts, clips)},
            "records": studies.records, "labels": studies.label_matrix(), "ct": ct, "synthesis": report,
            "synthesizer": synthesizer}


def training_phases(cfg: SpeechTrainConfig, cache_root: Path, progress: bool = True,
                    workers: int = 2) -> list[tuple[str, list]]:
    """What the demo training reads, as [(phase name, clips)] in the order worth making them: espeak-ng first
    (minutes of CPU for hours of speech: cfg.espeak_train_texts of the phantom studies, then the real reports), then
    Kokoro, which train() makes within its budget in this order: the training queries (about 3 s each), the real
    reports (about 110 s), the phantom reports (about 90 s; espeak-ng reads them all already). The spoken zero-shot
    prompts (cfg.spoken_prompts; about 2 s each) come before the queries in both engines; none when distillation is
    off (a prompt trains by distillation alone)."""
    from training.speech_data import ESPEAK_TRAIN_VOICES, TRAIN_VOICES

    def read(split, voices, kinds, engine="kokoro"):
        if split == "real" and cfg.n_real_studies == 0:
            return []
        _, texts, clips = split_plan(cfg, split, cache_root, voices, engine=engine, progress=progress,
                                     workers=workers)
        return [c for (_, k, _), c in zip(texts, clips) if k in kinds]

    def prompts(engine):
        if not (cfg.spoken_prompts and cfg.distill_weight > 0):
            return []
        return prompt_training_clips(engine, blended=cfg.blended_prompt_voices)

    return [("espeak-ng train split", read("train", ESPEAK_TRAIN_VOICES, cfg.espeak_train_texts, "espeak")),
            ("espeak-ng real reports", read("real", ESPEAK_TRAIN_VOICES, ("real_report",), "espeak")),
            (PROMPT_PHASES[0], prompts("espeak")),
            (PROMPT_PHASES[1], prompts("kokoro")),
            ("train queries", read("train", TRAIN_VOICES, set(cfg.texts) & {"query"})),
            ("real reports (Kokoro, training)", read("real", TRAIN_VOICES, ("real_report",))),
            ("train reports", read("train", TRAIN_VOICES, set(cfg.texts) & {"report"}))]


PROMPT_PHASES = ("espeak-ng zero-shot prompts", "zero-shot prompts (Kokoro, training)")   # training_phases' names


def prompt_training_clips(engine: str, blended: bool = False) -> list:
    """The 36 zero-shot prompts read by every training voice of `engine` ("kokoro": TRAIN_VOICES, then with
    `blended` the BLENDED_TRAIN_VOICES; "espeak": ESPEAK_TRAIN_VOICES) at a seeded speed in SPEED_RANGE, voice by
    voice (the blends come last, so the plain voices' clips are the same with or without them). The evaluation
    reads the same prompts with an EVAL_VOICES voice, which no training clip uses."""
    from engine.models.ctclip import all_zero_shot_prompts
    from training.speech_data import BLENDED_TRAIN_VOICES, ESPEAK_TRAIN_VOICES, SPEED_RANGE, TRAIN_VOICES, Clip

    voices = ESPEAK_TRAIN_VOICES if engine == "espeak" else TRAIN_VOICES + (BLENDED_TRAIN_VOICES if blended else ())
    rng = np.random.default_rng(4000 if engine == "kokoro" else 4500)
    return [Clip(text, voice, float(round(rng.uniform(*SPEED_RANGE), 3)), engine)
            for voice in voices for text in all_zero_shot_prompts()]


def synthesis_plan(cfg: SpeechTrainConfig, cache_root: Path, progress: bool = True) -> list[tuple[str, list]]:
    """Every clip the demo training and evaluation will ask for, as [(phase name, clips)] in the order worth making
    them: the espeak-ng training clips (phantom reports, real reports: minutes of CPU for hours of speech), the
    spoken zero-shot prompts of training (espeak-ng, then Kokoro), the training queries, the test queries, the 36
    spoken zero-shot prompts of the evaluation, the espeak-ng test split (cheap), the real reports of the acceptance
    test (tests/test_speech_real_reports.py), the test reports, the real training reports read by Kokoro (about 24 h
    of speech for 794), then the phantom training reports (about 90 s each)."""
    from training.eval_speech import prompt_clips, real_report_clips
    from training.speech_data import ESPEAK_VOICES, EVAL_VOICES

    def by_kind(voices, engine="kokoro"):
        _, texts, clips = split_plan(cfg, "test", cache_root, voices, engine=engine, progress=progress, workers=1)
        return {kind: [c for (_, k, _), c in zip(texts, clips) if k == kind] for kind in cfg.texts}

    train = dict(training_phases(cfg, cache_root, progress=progress, workers=1))
    test, espeak = by_kind(EVAL_VOICES), by_kind(ESPEAK_VOICES, engine="espeak")
    return [("espeak-ng train split", train["espeak-ng train split"]),
            ("espeak-ng real reports", train["espeak-ng real reports"]),
            *[(name, train[name]) for name in PROMPT_PHASES],
            ("train queries", train["train queries"]), ("test queries", test.get("query", [])),
            ("spoken zero-shot prompts", prompt_clips(EVAL_VOICES[0])),
            ("espeak-ng test split", [c for kind in cfg.texts for c in espeak[kind]]),
            ("real reports (acceptance test)", [clip for _, clip in real_report_clips()]),
            ("test reports", test.get("report", [])),
            ("real reports (Kokoro, training)", train["real reports (Kokoro, training)"]),
            ("train reports", train["train reports"])]


def synthesize_demo_clips(cfg: SpeechTrainConfig, cache_root: Path | None = None, budget_cpu_s: float | None = None,
                          threads: int = 2, progress: bool = True) -> dict:
    """`python -m training speech --synthesis-only`: render the phantom splits and make every clip of
    synthesis_plan() into cache_root/speech (default the training cache), stopping before any CT CLIP is loaded.
    Resumable clip by clip (a second call skips what exists); `budget_cpu_s` (None = no limit) caps the whole call.
    Returns {phase: synthesize() report} with each phase's clip count, made, cached and seconds of speech."""
    import time

    from engine.settings import training_cache_dir
    from training.speech_data import SpeechSynthesizer, synthesize

    cache_root = Path(cache_root or training_cache_dir() / "speech-demo")
    synthesizer = SpeechSynthesizer(cache_root / "speech", threads=threads)
    start, out = time.process_time(), {}
    for phase, clips in synthesis_plan(cfg, cache_root, progress=progress):
        left = None if budget_cpu_s is None else max(0.0, budget_cpu_s - (time.process_time() - start))
        out[phase] = synthesize(clips, synthesizer, left, progress=progress, desc=phase)
        print(json.dumps({"phase": phase} | out[phase]), flush=True)
    return out


def ctclip_pipeline():
    """The frozen CT CLIP (settings.ctclip_dir(), the shipped demo checkpoint unless $CT_CTCLIP_DIR says otherwise)."""
    from engine.pipelines.ctclip import CTClipPipeline

    pipeline = CTClipPipeline.from_pretrained(preset="demo")
    for p in pipeline.model.parameters():
        p.requires_grad_(False)
    pipeline.model.eval()
    return pipeline


# --------------------------------------------------------------------------------------------------------- train

def training_data(cfg: SpeechTrainConfig, cache_root: Path, pipeline, progress: bool = True) -> dict:
    """The demo training set: the clips of training_phases (espeak-ng all made; Kokoro made in phase order within
    cfg.synthesis_budget_cpu_s), each that exists paired with its study's frozen CT latent and its text's frozen
    text latent (demo_split), and the spoken prompts that exist, unpaired (prompt_items). {"items", "clips"
    {key: Clip}, "synthesis" {phase or "kokoro": report}, "synthesizer"}."""
    from training.speech_data import ESPEAK_TRAIN_VOICES, TRAIN_VOICES, SpeechSynthesizer, synthesize

    phases = training_phases(cfg, cache_root, progress=progress)
    synthesizer = SpeechSynthesizer(cache_root / "speech")
    synthesis = {name: synthesize(clips, synthesizer, progress=progress, desc=name)
                 for name, clips in phases if clips and clips[0].engine == "espeak"}
    kokoro = [clip for _, clips in phases for clip in clips if clip.engine == "kokoro"]
    synthesis["kokoro"] = synthesize(kokoro, synthesizer, cfg.synthesis_budget_cpu_s, progress=progress,
                                     desc="Kokoro training clips")
    wanted = {clip.key for _, clips in phases for clip in clips}
    sources = [("train", TRAIN_VOICES, "kokoro"), ("train", ESPEAK_TRAIN_VOICES, "espeak")]
    if cfg.n_real_studies != 0:
        sources += [("real", TRAIN_VOICES, "kokoro"), ("real", ESPEAK_TRAIN_VOICES, "espeak")]
    items, clips = [], {}
    for split, voices, engine in sources:     # budget 0: every clip wanted is made above, in the phases' order
        part = demo_split(cfg, split, cache_root, pipeline, voices, engine=engine, budget_cpu_s=0, progress=False)
        items += [item for item in part["items"] if item.key in wanted]
        clips.update(part["clips"])
    prompts = [clip for name, phase in phases if name in PROMPT_PHASES for clip in phase]
    items += prompt_items(prompts, pipeline, synthesizer)
    clips.update({clip.key: clip for clip in prompts})
    return {"items": items, "clips": clips, "synthesis": synthesis, "synthesizer": synthesizer}


def prompt_items(clips, pipeline, synthesizer) -> list[SpeechItem]:
    """Unpaired items of the spoken zero-shot prompt `clips` that were made: each clip's distillation target is the
    CT CLIP's latent of its prompt text (pipeline.prompt_latents, in all_zero_shot_prompts() order)."""
    from engine.models.ctclip import all_zero_shot_prompts

    prompt_latents = pipeline.prompt_latents.reshape(-1, pipeline.prompt_latents.shape[-1])
    latents = dict(zip(all_zero_shot_prompts(), prompt_latents))
    return [SpeechItem(clip.key, -1, np.zeros_like(latents[clip.text]), latents[clip.text], paired=False)
            for clip in clips if synthesizer.path(clip).is_file()]


def ct_bank(items: list[SpeechItem]) -> torch.Tensor:
    """(N, D): the distinct frozen CT latents of the paired items (the training studies), for the CT-logit term."""
    return torch.from_numpy(np.unique(np.stack([item.ct_latent for item in items if item.paired]), axis=0))


def train(cfg: SpeechTrainConfig, out_dir: Path, cache_root: Path | None = None, resume: bool = False,
          progress: bool = True) -> dict:
    """Prepare (or reuse) the data and caches, train through training/loop.py, export OUT/model (save_pretrained)."""
    from tqdm import tqdm

    from engine.settings import training_cache_dir

    if cfg.preset != "demo":
        return train_paper(cfg, out_dir, resume=resume, progress=progress)
    cache_root = Path(cache_root or training_cache_dir() / "speech-demo")
    if cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    loop = TrainingLoop(LoopConfig.from_config(cfg), out_dir, resume=resume, progress=progress, desc="speech")
    loop.write_run_config(asdict(cfg))
    pipeline = ctclip_pipeline()
    data = training_data(cfg, cache_root, pipeline, progress=progress)
    if len(data["items"]) < 2:
        raise SystemExit("fewer than 2 training clips were made: raise the synthesis budget")
    model = SpeechEncoder.from_whisper(cfg.model_config(pipeline.model.config.latent_dim), seed=cfg.seed)
    prefixes = WhisperPrefixCache(model, cache_root)
    for item in tqdm(data["items"], desc="Whisper prefixes (frozen)", unit="clip", disable=not progress):
        if not prefixes.path(item.key).is_file():
            prefixes.get(item.key, lambda k=item.key: data["synthesizer"].load(data["clips"][k]))
    prompt_table = torch.from_numpy(pipeline.prompt_latents.reshape(-1, pipeline.prompt_latents.shape[-1]))
    step = SpeechStep(model, float(pipeline.model.logit_scale.detach()), cfg.distill_weight, prompt_table,
                      cfg.prompt_contrast_weight, ct_bank(data["items"]), cfg.prompt_ct_logit_weight
                      ).to(loop.dist.device)
    out_dir = Path(out_dir)
    summary = loop.run(step, make_optimizer_factory(model, cfg), SpeechPairs(data["items"], CachedWindows(prefixes)),
                       collate=collate, inputs=batch_inputs(loop.dist.device),
                       on_checkpoint=lambda: model.save_pretrained(out_dir / "model"))
    summary.update({"clips": len(data["items"]), "synthesis": data["synthesis"], "ctclip": pipeline.model_id})
    if loop.dist.main:
        (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def train_paper(cfg: SpeechTrainConfig, out_dir: Path, resume: bool = False, progress: bool = True) -> dict:
    """The paper preset: Whisper-base, CT-RATE VolumeName-named audio, precomputed frozen CT-CLIP latents."""
    import pandas as pd
    from safetensors.numpy import load_file

    from engine.audio import read_audio
    from engine.errors import UserError

    if not (cfg.audio_dir and cfg.ct_latents and cfg.reports_csv):
        raise UserError("The paper preset needs --audio-dir, --ct-latents and --reports-csv.")
    loop = TrainingLoop(LoopConfig.from_config(cfg), out_dir, resume=resume, progress=progress, desc="speech")
    loop.write_run_config(asdict(cfg))
    ct = load_file(cfg.ct_latents)
    reports = pd.read_csv(cfg.reports_csv).set_index("VolumeName")
    files = sorted(p for p in Path(cfg.audio_dir).iterdir() if p.suffix in (".wav", ".flac") and p.stem in ct)
    if not files:
        raise UserError(f"No audio in {cfg.audio_dir} is named after a VolumeName of {cfg.ct_latents}.")
    from engine.pipelines.ctclip import CTClipPipeline
    from engine.settings import ctclip_dir

    pipeline = CTClipPipeline.from_pretrained(ctclip_dir(), preset="paper")
    text = pipeline.embed_texts([str(reports.loc[p.stem, "Findings_EN"]) for p in files])
    model = SpeechEncoder.from_whisper(cfg.model_config(pipeline.model.config.latent_dim), seed=cfg.seed)
    prefixes = WhisperPrefixCache(model, Path(out_dir) / "whisper-prefix")
    items = [SpeechItem(p.stem, i, ct[p.stem], text[i]) for i, p in enumerate(files)]
    windows = {p.stem: prefixes.get(p.stem, lambda p=p: read_audio(p).samples) for p in files}
    step = SpeechStep(model, float(pipeline.model.logit_scale.detach()), cfg.distill_weight).to(loop.dist.device)
    return loop.run(step, make_optimizer_factory(model, cfg), SpeechPairs(items, windows), collate=collate,
                    inputs=batch_inputs(loop.dist.device),
                    on_checkpoint=lambda: model.save_pretrained(Path(out_dir) / "model"))
