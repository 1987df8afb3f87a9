"""SpeechCT-CLIP training: a speech encoder joins the frozen CT CLIP's latent space.

    loss = symmetric InfoNCE(exp(t) * audio_latent @ ct_latent.T)            (audio <-> CT, frozen CT encoder)
         + distill_weight * mean(1 - cos(audio_latent, text_latent))          (frozen text teacher, the same report)
with exp(t) the frozen CT CLIP's logit scale, so the speech latents live on the CT CLIP's own scale and its zero-shot
rule applies to them unchanged. `--no-distill` (distill_weight 0) is the paper's ablation.

What is CT CLIP's here is frozen and cached: the teachers run in eval() once per study / text (their latents are
stored next to the data under the CT CLIP's model id, so a retrained CT CLIP recomputes them and retraining is the
same one command), and the Whisper layers below the trainable top are run once per window (their output, spoken
frames only in the demo, is cached in float16), so a training step runs only the top layers, the pooling and the
head. The loop (steps, time budget, checkpoint/resume, progress bar, torchrun) is training/loop.py.

Demo data (`prepare_demo`): phantom studies of training/ctclip_data.py's train split (held-out: its test split), each
with its generated report and short query read by a TRAIN_VOICES Kokoro voice at speed 0.9-1.1 (training/
speech_data.py), within a CPU budget. Paper data (`--audio-dir`): audio files named by CT-RATE VolumeName
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

    @staticmethod
    def read(path: Path) -> list[tuple[torch.Tensor, int]]:
        from safetensors.torch import load_file

        state = load_file(str(path))
        return [(state[f"w{i}"], int(state[f"n{i}"])) for i in range(len(state) // 2)]

    def get(self, key: str, samples_fn) -> list[tuple[torch.Tensor, int]]:
        """[(hidden (frames, d) float16, spoken frames)] per window of the clip `key` (samples_fn() gives audio).
        A clip cached at a shallower depth (another trainable_layers) continues from there instead of the audio."""
        from safetensors.torch import save_file

        path = self.root / f"{key}.safetensors"
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
    """One training pair: a clip (by key) with the frozen teachers' latents of its study and its text."""
    key: str
    study: int
    ct_latent: np.ndarray
    text_latent: np.ndarray


class SpeechPairs(torch.utils.data.Dataset):
    """Items -> (windows [(hidden, spoken)], ct latent (D,), text latent (D,)), windows from the prefix cache."""

    def __init__(self, items: list[SpeechItem], windows: dict[str, list[tuple[torch.Tensor, int]]]):
        self.items, self.windows = items, windows

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        return (self.windows[item.key], torch.from_numpy(item.ct_latent), torch.from_numpy(item.text_latent))


def collate(batch):
    windows, ct, text = zip(*batch)
    return list(windows), torch.stack(ct), torch.stack(text)


# ------------------------------------------------------------------------------------------------------ the step

class SpeechStep(nn.Module):
    """Loss of one batch from cached prefixes: the trainable Whisper top, pooling, head; frozen targets."""

    def __init__(self, model: SpeechEncoder, logit_scale: float, distill_weight: float):
        super().__init__()
        self.model, self.distill_weight = model, distill_weight
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

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

    def forward(self, clips, ct_latents: torch.Tensor, text_latents: torch.Tensor):
        audio = self.audio_latents(clips)
        contrastive = symmetric_infonce(self.logit_scale * audio @ ct_latents.t())
        distill = (1.0 - (audio * text_latents).sum(-1)).mean()
        loss = contrastive + self.distill_weight * distill
        return loss, {"contrastive": contrastive.detach(), "distill": distill.detach()}


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


def split_plan(cfg: SpeechTrainConfig, split: str, cache_root: Path, voices, engine: str = "kokoro",
               progress: bool = True, workers: int = 2) -> tuple:
    """(PhantomCache, texts [(study, kind, text)], clips aligned with texts) of one phantom split read by `voices`:
    the ONE home of the clip plan, so `--synthesis-only`, training and evaluation ask for the same clips. The split's
    phantoms are rendered (or found) under cache_root; texts are every study's cfg.texts in order (all queries first,
    then all reports)."""
    from training.ctclip_data import CachePlan, PhantomCache, build_cache
    from training.speech_data import plan_clips

    n = cfg.n_studies if split == "train" else cfg.n_test_studies
    root = build_cache(cache_root / f"phantoms-{split}-{n}", CachePlan(split=split, n_generated=n), workers=workers,
                       progress=progress)
    studies = PhantomCache(root)
    texts = [(i, kind, rec[kind]) for kind in cfg.texts for i, rec in enumerate(studies.records) if rec.get(kind)]
    seed = {"train": 1, "test": 2}[split] * 1000 + (0 if engine == "kokoro" else 500)
    return studies, texts, plan_clips([t for _, _, t in texts], voices, seed=seed, engine=engine)


def demo_split(cfg: SpeechTrainConfig, split: str, cache_root: Path, pipeline, voices, engine: str = "kokoro",
               budget_cpu_s: float | None = None, progress: bool = True) -> dict:
    """One phantom split read aloud: {"items": [SpeechItem], "clips": {key: Clip}, "records": study records,
    "synthesis": what was made}. Only clips that exist (within the budget) become items."""
    from engine.volume import Volume
    from training.speech_data import SpeechSynthesizer, synthesize

    studies, texts, clips = split_plan(cfg, split, cache_root, voices, engine=engine, progress=progress)
    n = cfg.n_studies if split == "train" else cfg.n_test_studies
    ct, text = teacher_latents(pipeline, cache_root / "teachers" / f"{pipeline.model_id}-{split}-{n}.safetensors",
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


def synthesis_plan(cfg: SpeechTrainConfig, cache_root: Path, progress: bool = True) -> list[tuple[str, list]]:
    """Every clip the demo training and evaluation will ask for, as [(phase name, clips)] in the order worth making
    them: the training reports read by espeak-ng (minutes of CPU for hours of speech), the training queries, the test queries, the 36 spoken zero-shot prompts, the espeak-ng test split (cheap),
    the real reports of the acceptance test (tests/test_speech_real_reports.py), the test reports, then the training
    reports (about 90 s each, the bulk of the CPU)."""
    from training.eval_speech import prompt_clips, real_report_clips
    from training.speech_data import ESPEAK_TRAIN_VOICES, ESPEAK_VOICES, EVAL_VOICES, TRAIN_VOICES

    def by_kind(split, voices, engine="kokoro"):
        _, texts, clips = split_plan(cfg, split, cache_root, voices, engine=engine, progress=progress, workers=1)
        return {kind: [c for (_, k, _), c in zip(texts, clips) if k == kind] for kind in cfg.texts}

    train, test = by_kind("train", TRAIN_VOICES), by_kind("test", EVAL_VOICES)
    espeak = by_kind("test", ESPEAK_VOICES, engine="espeak")
    espeak_train = by_kind("train", ESPEAK_TRAIN_VOICES, engine="espeak")
    return [("espeak-ng train split", [c for kind in cfg.espeak_train_texts for c in espeak_train[kind]]),
            ("train queries", train.get("query", [])), ("test queries", test.get("query", [])),
            ("spoken zero-shot prompts", prompt_clips(EVAL_VOICES[0])),
            ("espeak-ng test split", [c for kind in cfg.texts for c in espeak[kind]]),
            ("real reports (acceptance test)", [clip for _, clip in real_report_clips()]),
            ("test reports", test.get("report", [])), ("train reports", train.get("report", []))]


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

def train(cfg: SpeechTrainConfig, out_dir: Path, cache_root: Path | None = None, resume: bool = False,
          progress: bool = True) -> dict:
    """Prepare (or reuse) the data and caches, train through training/loop.py, export OUT/model (save_pretrained)."""
    from engine.settings import training_cache_dir
    from training.speech_data import ESPEAK_TRAIN_VOICES, TRAIN_VOICES

    if cfg.preset != "demo":
        return train_paper(cfg, out_dir, resume=resume, progress=progress)
    cache_root = Path(cache_root or training_cache_dir() / "speech-demo")
    if cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    loop = TrainingLoop(LoopConfig.from_config(cfg), out_dir, resume=resume, progress=progress, desc="speech")
    loop.write_run_config(asdict(cfg))
    pipeline = ctclip_pipeline()
    data = demo_split(cfg, "train", cache_root, pipeline, TRAIN_VOICES, budget_cpu_s=cfg.synthesis_budget_cpu_s,
                      progress=progress)
    if cfg.espeak_train_texts:      # the robustness source: espeak-ng reads what Kokoro's budget could not
        espeak = demo_split(cfg, "train", cache_root, pipeline, ESPEAK_TRAIN_VOICES, engine="espeak",
                            progress=progress)
        data["items"] += [item for item in espeak["items"] if espeak["kind_of"][item.key] in cfg.espeak_train_texts]
        data["clips"].update(espeak["clips"])
        data["synthesis"] = {"kokoro": data["synthesis"], "espeak-ng": espeak["synthesis"]}
    if len(data["items"]) < 2:
        raise SystemExit("fewer than 2 training clips were made: raise the synthesis budget")
    model = SpeechEncoder.from_whisper(cfg.model_config(pipeline.model.config.latent_dim), seed=cfg.seed)
    prefixes = WhisperPrefixCache(model, cache_root)
    windows = {item.key: prefixes.get(item.key, lambda k=item.key: data["synthesizer"].load(data["clips"][k]))
               for item in data["items"]}
    step = SpeechStep(model, float(pipeline.model.logit_scale.detach()), cfg.distill_weight).to(loop.dist.device)
    out_dir = Path(out_dir)
    summary = loop.run(step, make_optimizer_factory(model, cfg), SpeechPairs(data["items"], windows), collate=collate,
                       inputs=lambda batch: ((batch[0], batch[1].to(loop.dist.device), batch[2].to(loop.dist.device)),
                                             {}),
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
                    inputs=lambda batch: ((batch[0], batch[1].to(loop.dist.device), batch[2].to(loop.dist.device)), {}),
                    on_checkpoint=lambda: model.save_pretrained(Path(out_dir) / "model"))
