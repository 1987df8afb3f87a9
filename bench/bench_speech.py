"""Speech flow benchmark on CPU (issue 13): a 30 s and a 90 s dictation file -> top-10, the cost of one streaming
update per 3 s chunk, the encoder per 30 s window (padded vs spoken frames only), and the peak memory with the speech
model loaded.

    .venv/bin/python bench/bench_speech.py [--weights DIR] [--runs N]   # default: assets/speech, else an untrained
                                                                       # demo encoder (the same cost)

Each "file -> top-10" run is what `engine retrieve --audio FILE` does after its models are loaded: read and convert
the WAV (engine.audio.read_audio), encode it (engine.pipelines.speech), rank the library and read the 18 findings.
The streaming figure is the median over the updates of a 60 s dictation fed to engine.pipelines.speech.Dictation in
3 s chunks (finished 30 s windows cached, only the last one encoded), so it includes the updates after a window
boundary. Targets (issue 13): 30 s -> top-10 at most 1.0 s, 90 s at most 2.5 s. Medians of --runs runs after one
warm-up; peak memory is this process's ru_maxrss (models loaded and every run done). Take the figures on a quiet
machine. Dictations are espeak-ng readings of a report (-s 140), repeated to length.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.audio import SAMPLE_RATE, read_audio  # noqa: E402
from timing import median_seconds, peak_rss_mb  # noqa: E402  (bench/timing.py)

REPORT = ("Findings: There is a moderate right pleural effusion with adjacent atelectasis. The heart is enlarged. "
          "Calcified plaques are seen in the coronary arteries. Impression: right pleural effusion, cardiomegaly.")
CHUNK_S = 3.0



def dictation(seconds: float, folder: Path) -> Path:
    """A WAV file (16 kHz mono) of `seconds` of dictation: the report read by espeak-ng, repeated to length."""
    once_path = folder / "once.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(once_path), REPORT], check=True)
    once = read_audio(once_path).samples
    samples = np.tile(once, int(np.ceil(seconds * SAMPLE_RATE / once.size)))[: int(seconds * SAMPLE_RATE)]
    path = folder / f"dictation_{seconds:.0f}s.wav"
    soundfile.write(str(path), samples, SAMPLE_RATE, subtype="PCM_16")
    return path


def load_models(weights: str | None):
    from engine.models.speech_encoder import SpeechEncoder, SpeechEncoderConfig
    from engine.pipelines.ctclip import CTClipPipeline
    from engine.pipelines.speech import SpeechPipeline
    from engine.settings import speech_dir
    from engine.study_library import StudyLibrary

    ctclip = CTClipPipeline.from_pretrained(preset="demo")
    folder = Path(weights) if weights else speech_dir()
    if (folder / "config.json").is_file():
        speech, trained = SpeechPipeline.from_pretrained(folder, ctclip=ctclip), str(folder)
    else:
        encoder = SpeechEncoder.from_whisper(SpeechEncoderConfig.demo(ctclip.model.config.latent_dim))
        speech, trained = SpeechPipeline(encoder, ctclip), "untrained demo encoder (no checkpoint)"
    speech.ctclip.prompt_latents  # the 36 cached label prompts, as the app and the CLI hold them
    return speech, StudyLibrary(ctclip), trained


def file_to_top10(speech, library, path: Path) -> None:
    latent = speech.embed_audio(read_audio(path))
    library.search(latent, k=10)
    speech.findings(latent)


def streaming_updates(speech, path: Path) -> list[float]:
    """Seconds of each Dictation.update() when a 60 s recording arrives in CHUNK_S chunks (one ranking per chunk)."""
    from engine.pipelines.speech import Dictation

    samples = read_audio(path).samples
    step = int(CHUNK_S * SAMPLE_RATE)
    session, times = Dictation(speech), []
    for start in range(0, samples.size, step):
        session.add(samples[start:start + step])
        began = time.perf_counter()
        latent = session.update()
        if latent is not None:
            times.append(time.perf_counter() - began)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="speech encoder folder (default assets/speech)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rss_before = peak_rss_mb()
    speech, library, weights = load_models(args.weights)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "weights": weights,
           "whisper": speech.encoder.config.whisper, "runs": args.runs,
           "peak_rss_models_loaded_mb": round(peak_rss_mb(), 1), "peak_rss_before_models_mb": round(rss_before, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        for seconds in (30, 90):
            path = dictation(seconds, Path(tmp))
            out[f"file_{seconds}s_to_top10_s"] = round(
                median_seconds(lambda: file_to_top10(speech, library, path), args.runs), 3)
        path = dictation(60, Path(tmp))
        updates = [streaming_updates(speech, path) for _ in range(args.runs)]
        out["stream_update_per_3s_chunk_s"] = round(statistics.median(t for run in updates for t in run), 3)
        out["stream_update_max_s"] = round(max(t for run in updates for t in run), 3)
        out["stream_updates_per_60s"] = len(updates[0])
        window = speech.encoder.window(read_audio(path).samples[: 10 * SAMPLE_RATE])
    with torch.inference_mode():
        out["window_10s_spoken_only_s"] = round(median_seconds(lambda: speech.encoder.run_encoder(window),
                                                               args.runs), 3)
        spoken_only = speech.encoder.config.spoken_frames_only
        speech.encoder.config.spoken_frames_only = False
        out["window_10s_padded_30s_s"] = round(median_seconds(lambda: speech.encoder.run_encoder(window),
                                                              args.runs), 3)
        speech.encoder.config.spoken_frames_only = spoken_only
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
