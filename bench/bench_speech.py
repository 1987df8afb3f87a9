"""Speech flow benchmark on CPU (issue 13): a 30 s and a 90 s dictation -> top-10, one streaming update per 3 s chunk,
the encoder per 30 s window (padded vs spoken frames only), and the peak memory with the speech model loaded.

    .venv/bin/python bench/bench_speech.py [--weights DIR]   # default: assets/speech, else an untrained demo encoder

Targets (issue 13): 30 s -> top-10 at most 1.0 s, 90 s at most 2.5 s. Medians of several runs; run it on a quiet
machine. Dictations are espeak-ng readings of a report, repeated to length.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.audio import read_audio  # noqa: E402
from engine.models.speech_encoder import SpeechEncoder, SpeechEncoderConfig, StreamingCache  # noqa: E402

REPORT = ("Findings: There is a moderate right pleural effusion with adjacent atelectasis. The heart is enlarged. "
          "Calcified plaques are seen in the coronary arteries. Impression: right pleural effusion, cardiomegaly.")


def median_seconds(fn, runs: int = 5) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def dictation(seconds: float) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(path), REPORT], check=True)
        once = read_audio(path).samples
    return np.tile(once, int(np.ceil(seconds * 16000 / once.size)))[: int(seconds * 16000)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", default=None)
    args = parser.parse_args()
    from engine.pipelines.ctclip import CTClipPipeline
    from engine.pipelines.speech import SpeechPipeline
    from engine.settings import speech_dir
    from engine.study_library import StudyLibrary

    ctclip = CTClipPipeline.from_pretrained(preset="demo")
    weights = Path(args.weights) if args.weights else speech_dir()
    if (weights / "config.json").is_file():
        speech = SpeechPipeline.from_pretrained(weights, ctclip=ctclip)
    else:
        encoder = SpeechEncoder.from_whisper(SpeechEncoderConfig.demo(ctclip.model.config.latent_dim)).eval()
        speech = SpeechPipeline(encoder, ctclip)
    library = StudyLibrary(ctclip)
    out = {"threads": torch.get_num_threads(), "whisper": speech.encoder.config.whisper}
    for seconds in (30, 90):
        samples = dictation(seconds)
        out[f"top10_{seconds}s_s"] = round(median_seconds(
            lambda: library.search(speech.encoder.embed(samples), k=10), runs=3), 3)
    samples = dictation(60)
    cache = StreamingCache()
    speech.encoder.embed(samples[: 57 * 16000], cache=cache)          # window 0 finished and cached
    out["stream_update_3s_chunk_s"] = round(median_seconds(lambda: speech.encoder.embed(samples, cache=cache)), 3)
    window = speech.encoder.window(samples[: 10 * 16000])
    with torch.inference_mode():
        out["window_10s_spoken_only_s"] = round(median_seconds(lambda: speech.encoder.run_encoder(window)), 3)
        speech.encoder.config.spoken_frames_only = False
        out["window_10s_padded_30s_s"] = round(median_seconds(lambda: speech.encoder.run_encoder(window)), 3)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
