"""Evaluation of a speech encoder on UNSEEN voices (the trunk's metric code, training/evaluate.py).

On the held-out phantom test split (training/ctclip_data.py's test seeds), read aloud by the Kokoro voices of
EVAL_VOICES (never trained on):
- spoken report -> volume Recall@{5, 10, 50, 100}; spoken short query -> volume Recall@10;
- zero-shot with SPOKEN prompts: the 36 prompts ("{label} is present." / "... is not present.") read by an unseen
  voice and encoded by the speech encoder, CT-CLIP's rule on the frozen CT latents (macro AUROC, F1, ...), scored
  on the CT CLIP's own held-out test phantoms (ZERO_SHOT_STUDIES = 300, the split its zero-shot AUROC is measured
  on; a prompt needs no spoken report, so the number is not limited to the few studies read aloud), per label too;
  also on the read-aloud test studies alone ("zero_shot_on_speech_test_studies"; 30 studies are a noisy estimate);
- the same with the text teacher (the CT CLIP's text tower), the reference row of the paper's table;
- robustness the paper did not measure: the report clips with background noise at 10 dB SNR (white noise shaped by
  nothing: the worst case for its level), telephone-band audio (300-3400 Hz band-pass, 8 kHz and back), and the
  reports read by espeak-ng (another synthesiser altogether);
- what the Dictate tab's bars show ("dictation_reading"): the 18 labels read from the spoken reports' latents by the
  CT CLIP's text reader against what the reports state (labels marked per report, errors at 0.5, Brier, AUROC),
  next to their text latents read the same way and to the image rule alone on the spoken latents.
Written into the checkpoint's metrics.json, with the issue's demo targets ("targets": zero-shot gap, R@10 share of
the text encoder's). The paper's table (text teacher vs speech without / with distillation) needs a second
checkpoint trained with --no-distill: `add_comparison` (`speech-eval --compare-no-distill DIR`) writes it into the
distilled checkpoint's metrics.json as "comparison".
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.labels import LABELS
from training.evaluate import recall_at_k, zero_shot_metrics

ZERO_SHOT_STUDIES = 300
NOISE_SNR_DB = 10.0
TELEPHONE_BAND_HZ = (300.0, 3400.0)
TELEPHONE_RATE = 8000


def add_noise(samples: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    """White Gaussian noise at `snr_db` dB below the signal's mean power (16 kHz samples in, same out)."""
    power = float(np.mean(samples.astype(np.float64) ** 2))
    noise = np.random.default_rng(seed).normal(0.0, np.sqrt(power / 10 ** (snr_db / 10)), samples.shape)
    return np.clip(samples + noise, -1.0, 1.0).astype(np.float32)


def telephone_band(samples: np.ndarray, rate: int = 16000) -> np.ndarray:
    """A narrow-band telephone channel: 4th-order Butterworth band-pass 300-3400 Hz, down to 8 kHz and back up."""
    from scipy.signal import butter, resample_poly, sosfiltfilt

    sos = butter(4, TELEPHONE_BAND_HZ, btype="bandpass", fs=rate, output="sos")
    narrow = resample_poly(sosfiltfilt(sos, samples), TELEPHONE_RATE, rate)
    return resample_poly(narrow, rate, TELEPHONE_RATE).astype(np.float32)


def speech_latents(model, synthesizer, clips, transform=None) -> np.ndarray:
    """(n, D) unit latents of the clips (optionally transformed 16 kHz samples first)."""
    from tqdm import tqdm

    out = []
    for clip in tqdm(clips, desc="speech latents", unit="clip"):
        samples = synthesizer.load(clip)
        out.append(model.embed(transform(samples) if transform else samples))
    return np.stack(out)


def retrieval(latents: np.ndarray, studies: list[int], ct: np.ndarray, ks=(5, 10, 50, 100)) -> dict:
    """Recall@K of each query latent against every test volume (K above the gallery size are left out)."""
    ks = tuple(k for k in ks if k <= len(ct)) or (len(ct),)
    return recall_at_k(latents @ ct.T, np.asarray(studies), ks=ks)


def prompt_clips(voice: str) -> list:
    """The 36 zero-shot prompts in (label, pair) order, each read by `voice` at speed 1.0."""
    from engine.models.ctclip import all_zero_shot_prompts
    from training.speech_data import Clip

    return [Clip(text, voice, 1.0) for text in all_zero_shot_prompts()]


REAL_REPORTS_SPOKEN = 6      # real reports of the acceptance test (tests/test_speech_real_reports.py)
REAL_REPORT_MIN_LABELS = 2


def real_report_clips(n: int = REAL_REPORTS_SPOKEN) -> list[tuple[set[str], object]]:
    """[(hand-set labels, Clip)] of the `n` shortest real CT-RATE reports with at least REAL_REPORT_MIN_LABELS labels,
    each read whole by a Kokoro voice of EVAL_VOICES (never trained on) at speed 1.0: the acceptance test's
    dictations (the test makes them once per machine into engine.settings.user_cache_dir()/speech; `python -m
    training speech --synthesis-only` makes them into the training cache too). The speech training, which reads
    the other real reports, holds these out (held_out_report_texts)."""
    from training.ctclip_data import load_real_reports
    from training.speech_data import EVAL_VOICES, Clip

    reports = load_real_reports()
    reports = reports[reports["labels"].str.len() >= REAL_REPORT_MIN_LABELS]
    reports = reports.assign(words=reports["text"].str.split().str.len()).sort_values("words", kind="stable")
    return [(set(row.labels), Clip(row.text, EVAL_VOICES[i % len(EVAL_VOICES)], 1.0))
            for i, row in enumerate(reports.head(n).itertuples())]


def held_out_report_texts() -> set[str]:
    """The texts of real_report_clips(): the real reports the speech training never hears (it matches by text, so a
    copy of one of them elsewhere in the CSV is held out too)."""
    return {clip.text for _, clip in real_report_clips()}


def spoken_prompt_latents(model, synthesizer, voice: str) -> np.ndarray:
    """(18, 2, D): the 36 zero-shot prompts spoken by `voice`, encoded, in the CT CLIP's prompt_latents order."""
    return speech_latents(model, synthesizer, prompt_clips(voice)).reshape(len(LABELS), 2, -1)


def zero_shot_with(prompt_latents: np.ndarray, ct: np.ndarray, labels: np.ndarray, scale: float) -> dict:
    """Zero-shot metrics of prompt latents (18, 2, D), CT-CLIP's rule on the frozen CT latents (N, D)."""
    import torch

    from engine.models.ctclip import zero_shot_probabilities

    probs = zero_shot_probabilities(torch.from_numpy(ct), torch.from_numpy(np.asarray(prompt_latents)), scale)
    return zero_shot_metrics(probs.numpy(), labels)


def ctclip_test_split(pipeline, n: int = ZERO_SHOT_STUDIES, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(CT latents (n, D), labels (n, 18)) of the first n phantoms of the CT CLIP's test cache (ctclip-eval's split,
    rendered when missing), encoded once per CT CLIP and kept beside the cache (training/ctclip_ood.cache_latents)."""
    from engine.settings import training_cache_dir
    from training.ctclip_data import TEST_PLAN_SIZE
    from training.ctclip_ood import cache_latents, phantom_split

    cache = phantom_split(training_cache_dir() / "ctclip-demo" / "test", "test", n, TEST_PLAN_SIZE,
                          pipeline.preprocessing, workers=1, progress=progress)
    return cache_latents(pipeline, cache, n, "CT latents (CT CLIP test split)", progress), cache.label_matrix()


def evaluate(checkpoint: Path, cache_root: Path | None = None, out: Path | None = None, n_test_studies: int = 100,
             robustness: bool = True, synthesis_budget_cpu_s: float | None = None) -> dict:
    """The speech encoder in `checkpoint` on the test split (module docstring) -> metrics dict, also written to
    OUT (default CHECKPOINT/metrics.json). New Kokoro clips are made within `synthesis_budget_cpu_s` (queries first,
    then reports); only the clips that exist are evaluated."""
    from engine.models.speech_encoder import SpeechEncoder
    from engine.settings import training_cache_dir
    from training.speech_data import ESPEAK_VOICES, EVAL_VOICES
    from training.train_speech import SpeechTrainConfig, ctclip_pipeline, demo_split

    cache_root = Path(cache_root or training_cache_dir() / "speech-demo")
    cfg = SpeechTrainConfig(n_test_studies=n_test_studies, texts=("query", "report"))
    model = SpeechEncoder.from_pretrained(checkpoint)
    pipeline = ctclip_pipeline()
    scale = float(pipeline.model.logit_scale.detach())
    data = demo_split(cfg, "test", cache_root, pipeline, EVAL_VOICES, budget_cpu_s=synthesis_budget_cpu_s)
    synth, ct, labels = data["synthesizer"], data["ct"], data["labels"]
    by_kind = {kind: [(item, data["clips"][item.key]) for item, k in zip(data["items"], data["kinds"]) if k == kind]
               for kind in ("report", "query")}
    metrics = {"voices": list(EVAL_VOICES), "n_test_studies": len(ct), "ctclip": pipeline.model_id,
               "clips": {kind: len(pairs) for kind, pairs in by_kind.items()}}
    spoken = spoken_prompt_latents(model, synth, EVAL_VOICES[0])
    metrics["zero_shot_on_speech_test_studies"] = {
        "n": len(ct), "text": zero_shot_with(pipeline.prompt_latents, ct, labels, scale)["macro"]["auroc"],
        "speech": zero_shot_with(spoken, ct, labels, scale)["macro"]["auroc"]}
    ct_zs, labels_zs = ctclip_test_split(pipeline)
    text_zs, speech_zs = (zero_shot_with(p, ct_zs, labels_zs, scale) for p in (pipeline.prompt_latents, spoken))
    metrics["zero_shot_studies"] = len(ct_zs)
    metrics["text_zero_shot_macro_auroc"] = text_zs["macro"]["auroc"]
    metrics["speech_zero_shot"] = {"macro": speech_zs["macro"], "voice": EVAL_VOICES[0]}
    metrics["zero_shot_per_label"] = {label: {"text": text_zs["per_label"][label]["auroc"],
                                              "speech": speech_zs["per_label"][label]["auroc"]}
                                      for label in LABELS if label in text_zs["per_label"]}
    for kind, pairs in by_kind.items():
        if not pairs:
            continue
        studies = [item.study for item, _ in pairs]
        text = np.stack([item.text_latent for item, _ in pairs])
        metrics[f"text_{kind}_recall"] = retrieval(text, studies, ct)
        latents = speech_latents(model, synth, [clip for _, clip in pairs])
        metrics[f"speech_{kind}_recall"] = retrieval(latents, studies, ct)
        metrics[f"speech_{kind}_cosine_to_text"] = float(np.mean(np.sum(latents * text, axis=1)))
        if kind == "report":
            metrics["dictation_reading"] = dictation_reading(pipeline, latents, text, labels[studies])
        if robustness and kind == "report":
            clips = [clip for _, clip in pairs]
            metrics["noise_10db_report_recall"] = retrieval(
                speech_latents(model, synth, clips, lambda s: add_noise(s, NOISE_SNR_DB)), studies, ct)
            metrics["telephone_report_recall"] = retrieval(
                speech_latents(model, synth, clips, telephone_band), studies, ct)
            espeak = demo_split(cfg, "test", cache_root, pipeline, ESPEAK_VOICES, engine="espeak")
            pairs_e = [(i, espeak["clips"][i.key]) for i, k in zip(espeak["items"], espeak["kinds"]) if k == kind]
            metrics["espeak_report_recall"] = retrieval(
                speech_latents(model, synth, [c for _, c in pairs_e]), [i.study for i, _ in pairs_e], ct)
    metrics["targets"] = demo_targets(metrics)
    out = Path(out or Path(checkpoint) / "metrics.json")
    out.write_text(json.dumps(metrics, indent=1))
    return metrics


def dictation_reading(pipeline, speech: np.ndarray, text: np.ndarray, labels: np.ndarray) -> dict:
    """What the Dictate tab's bars show, measured: the 18 labels read from the spoken reports' latents by the CT
    CLIP's text reader (engine/text_reading.py), next to the same reports' text latents read the same way and the
    spoken latents read by the image rule alone, each against the labels their reports state."""
    from training.ctclip_text_reading import reading_measures

    def read(latents, rule):
        return np.array([[rule(latent)[label] for label in LABELS] for latent in latents])

    def measured(latents, rule):
        return {k: v for k, v in reading_measures(read(latents, rule), labels).items() if k != "per_label_auroc"}

    return {"n": int(len(labels)), "reader": "text_reading.json" if pipeline.text_reader is not None else None,
            "speech": measured(speech, lambda latent: pipeline.text_reading_from_latent(latent, source="speech")),
            "text": measured(text, lambda latent: pipeline.text_reading_from_latent(latent, source="speech")),
            "speech_image_rule": measured(speech, pipeline.zero_shot_from_latent)}


ZERO_SHOT_TARGET_GAP = 0.03     # demo target: speech zero-shot macro AUROC within 0.03 of the text encoder's
RECALL_TARGET_SHARE = 0.85      # demo target: speech R@10 at least 0.85 x the text R@10


def demo_targets(metrics: dict) -> dict:
    """The issue's demo targets on the held-out split, from one checkpoint's metrics: the gaps and whether they hold."""
    out = {}
    speech_zs = metrics["speech_zero_shot"]["macro"]["auroc"]
    gap = metrics["text_zero_shot_macro_auroc"] - speech_zs
    out["zero_shot_auroc_gap"] = {"value": round(gap, 4), "target": f"<= {ZERO_SHOT_TARGET_GAP}",
                                  "met": bool(gap <= ZERO_SHOT_TARGET_GAP)}
    for kind in ("report", "query"):
        text, speech = metrics.get(f"text_{kind}_recall", {}), metrics.get(f"speech_{kind}_recall", {})
        if "R@10" in text and "R@10" in speech and text["R@10"] > 0:
            share = speech["R@10"] / text["R@10"]
            out[f"{kind}_r10_share_of_text"] = {"value": round(share, 4), "target": f">= {RECALL_TARGET_SHARE}",
                                               "met": bool(share >= RECALL_TARGET_SHARE)}
    return out


TABLE_RECALLS = (("report", 5), ("report", 10), ("report", 50), ("report", 100), ("query", 10))


def comparison_rows(with_distill: dict, without_distill: dict) -> list[dict]:
    """The paper's comparison (text teacher vs speech without vs with distillation) on the same test split: one row
    per encoder, zero-shot macro AUROC (spoken prompts for speech) and spoken report / query -> volume recall."""
    def row(name, zero_shot, source, prefix):
        recalls = {f"{kind} R@{k}": source.get(f"{prefix}_{kind}_recall", {}).get(f"R@{k}")
                   for kind, k in TABLE_RECALLS}
        return {"encoder": name, "zero-shot macro AUROC": zero_shot, **recalls}
    return [row("text teacher (CT CLIP)", with_distill["text_zero_shot_macro_auroc"], with_distill, "text"),
            row("speech, no distillation", without_distill["speech_zero_shot"]["macro"]["auroc"], without_distill,
                "speech"),
            row("speech, distillation", with_distill["speech_zero_shot"]["macro"]["auroc"], with_distill, "speech")]


def comparison_table(with_distill: dict, without_distill: dict) -> str:
    """comparison_rows as a Markdown table (a missing figure is a dash)."""
    rows = comparison_rows(with_distill, without_distill)
    columns = list(rows[0])
    cell = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                     + ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows])


def add_comparison(metrics_path: Path, no_distill_metrics_path: Path) -> str:
    """Write the comparison table into `metrics_path` (the distilled checkpoint's metrics.json) as "comparison"
    (rows + markdown), from the no-distillation checkpoint's metrics.json; returns the Markdown. Both must come
    from the same CT CLIP and test split (checked)."""
    from engine.errors import UserError

    if not Path(no_distill_metrics_path).is_file():
        raise UserError(f"No metrics.json in '{Path(no_distill_metrics_path).parent}': evaluate the no-distillation "
                        "checkpoint first (python -m training speech-eval --checkpoint DIR).")
    with_distill = json.loads(Path(metrics_path).read_text())
    without = json.loads(Path(no_distill_metrics_path).read_text())
    for key in ("ctclip", "n_test_studies"):
        if with_distill.get(key) != without.get(key):
            raise UserError(f"The two checkpoints were evaluated with a different {key} ({with_distill.get(key)} vs "
                            f"{without.get(key)}): evaluate both against the same CT CLIP and split.")
    markdown = comparison_table(with_distill, without)
    with_distill["comparison"] = {"rows": comparison_rows(with_distill, without), "markdown": markdown,
                                  "no_distill_metrics": str(no_distill_metrics_path)}
    Path(metrics_path).write_text(json.dumps(with_distill, indent=1))
    return markdown
