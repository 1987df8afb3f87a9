"""`python -m engine VERB ... [--json]`: the command-line face of the engine (see docs/architecture.md).

Every verb takes --json and then prints exactly one JSON object on stdout. On bad input the exit status is 2 and the
output is {"error": "<one clear sentence>"} (without --json: `error: <sentence>` on stderr). No traceback reaches a
user: unexpected failures are reported as one sentence too (exit status 1), with the detail only under --debug.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from engine.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError instead of printing usage and exiting, so --json stays one JSON object."""

    def error(self, message):  # noqa: D401 - argparse hook
        raise UserError(f"Invalid arguments: {message}.")


# --------------------------------------------------------------------------------------------------------- verbs

def cmd_info(args) -> dict:
    import platform

    import torch

    from engine import LABELS
    from engine.volume import DEMO_SHAPE_ZYX, DEMO_SPACING_XYZ

    out = {
        "engine": "ct-workstation",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "labels": list(LABELS),
        "conventions": {"array_axes": "(z, y, x)", "spacing_order": "(x, y, z) mm", "orientation": "LPS",
                        "intensity": "HU"},
        "demo_grid": {"shape": list(reversed(DEMO_SHAPE_ZYX)), "spacing": list(DEMO_SPACING_XYZ)},
    }
    from engine.info import models_info

    out.update(models_info())
    return out


def cmd_inspect(args) -> dict:
    given = [name for name in ("ct", "cxr", "audio") if getattr(args, name)]
    if len(given) != 1:
        raise UserError("Give exactly one of --ct, --cxr or --audio.")
    if args.ct:
        from engine.volume import inspect_ct, read_ct

        return inspect_ct(read_ct(args.ct))
    if args.cxr:
        from engine.radiograph import read_radiograph

        cxr = read_radiograph(args.cxr)
        h, w = cxr.image.shape
        return {"kind": "radiograph", "shape": [w, h], "pixel_spacing_mm": cxr.pixel_spacing_mm,
                "warnings": list(cxr.warnings)}
    from engine.audio import SAMPLE_RATE, read_audio, rms_dbfs, split_windows

    audio = read_audio(args.audio)
    return {"kind": "audio", "seconds": round(audio.seconds, 3), "sample_rate": SAMPLE_RATE,
            "rms_dbfs": round(rms_dbfs(audio.samples), 2), "windows_30s": len(split_windows(audio.samples))}


def cmd_phantom(args) -> dict:
    from engine.labels import check_labels, label_dict

    try:
        labels = check_labels(args.labels.split(",")) if args.labels is not None else None
    except ValueError as err:
        raise UserError(str(err)) from None
    out = Path(args.out)
    if not out.name.endswith((".nii.gz", ".nii")):
        raise UserError(f"The output file must end in .nii.gz or .nii, not {out.name!r}.")
    if not out.parent.exists():
        raise UserError(f"The output folder {str(out.parent)!r} does not exist.")
    from engine.phantom import make_study
    from engine.volume import write_nifti

    study = make_study(args.seed, labels=labels)
    write_nifti(study.volume, out)
    return {
        "path": str(out),
        "labels": label_dict(study.labels),
        "report": study.report.text,
        "findings": [f.to_json() for f in study.findings],
        "seed": args.seed,
        "shape": list(study.volume.shape_xyz),
        "spacing": [round(s, 6) for s in study.volume.spacing],
    }


def _pipeline(args):
    from engine.pipelines.ctclip import CTClipPipeline

    return CTClipPipeline.from_pretrained(args.weights, preset=args.preset)


def _library(args, pipeline):
    from engine.study_library import StudyLibrary

    return StudyLibrary(pipeline, user_dir=args.library)


def cmd_retrieve(args) -> dict:
    from engine.query import check_query_text

    if bool(args.text) == bool(args.audio):
        raise UserError("Give exactly one of --text or --audio.")
    if args.audio:
        return retrieve_audio(args)
    text = check_query_text(args.text)  # before loading any model: bad queries answer at once
    if args.k < 1 or args.k > 1000:
        raise UserError("--k must be between 1 and 1000.")
    from engine.study_library import user_library_folder

    user_library_folder(args.library)     # a library that is a file: one sentence before the model loads
    started = time.perf_counter()
    pipeline = _pipeline(args)
    library = _library(args, pipeline)
    results = library.search(pipeline.embed_query(text), k=args.k)
    return {"query": {"kind": "text", "seconds": None}, "results": [r.to_json() for r in results],
            "elapsed_s": round(time.perf_counter() - started, 4)}


def cmd_zeroshot(args) -> dict:
    from engine.volume import read_ct

    volume = read_ct(args.ct)  # before loading any model: a bad file answers at once
    started = time.perf_counter()
    pipeline = _pipeline(args)
    findings = pipeline.zero_shot(volume)
    return {"findings": findings, "model_id": pipeline.model_id, "warnings": volume.warnings,
            "elapsed_s": round(time.perf_counter() - started, 4)}


def cmd_index(args) -> dict:
    from engine.study_library import user_library_folder

    user_library_folder(args.library)
    pipeline = _pipeline(args)
    library = _library(args, pipeline)
    added = []
    for path in args.ct:
        sid, new = library.index_file(path)  # each file commits on its own: an interrupted run keeps what it did
        added.append({"id": sid, "path": str(Path(path).resolve()), "added": new})
    return {"indexed": added, "library": str(library.user_dir), "size": len(library.user_index),
            "model_id": pipeline.model_id}


# ------------------------------------------------------------------------- speech (issue 13): retrieve --audio, dictate

def _speech_pipeline(args):
    from engine.pipelines.speech import SpeechPipeline

    return SpeechPipeline.from_pretrained(getattr(args, "speech_weights", None), ctclip=_pipeline(args))


def _audio_answer(args, audio, started: float) -> dict:
    """The design note's retrieve JSON for a recording (query.kind "audio", its seconds), plus the 18 label
    probabilities read from the speech latent and any warnings about the recording."""
    from engine.pipelines.speech import SpeechPipeline, dictation_warnings

    SpeechPipeline.check(audio)                       # too short: one sentence before any model loads
    if args.k < 1 or args.k > 1000:
        raise UserError("--k must be between 1 and 1000.")
    from engine.study_library import user_library_folder

    user_library_folder(args.library)
    pipeline = _speech_pipeline(args)
    latent = pipeline.embed_audio(audio)
    results = _library(args, pipeline.ctclip).search(latent, k=args.k)
    return {"query": {"kind": "audio", "seconds": round(audio.seconds, 3)}, "results": [r.to_json() for r in results],
            "findings": pipeline.findings(latent), "warnings": dictation_warnings(audio),
            "elapsed_s": round(time.perf_counter() - started, 4)}


def retrieve_audio(args) -> dict:
    from engine.audio import read_audio

    started = time.perf_counter()
    return _audio_answer(args, read_audio(args.audio), started)


def cmd_dictate(args) -> dict:
    """Record --seconds from the local microphone (sounddevice), then answer as retrieve --audio does."""
    from engine.audio import SAMPLE_RATE, read_audio

    if not 1 <= args.seconds <= 600:
        raise UserError("--seconds must be between 1 and 600.")
    no_microphone = "No microphone was found (no audio input device); use 'retrieve --audio FILE'."
    try:
        import sounddevice
    except OSError:  # the PortAudio library itself is missing (apt-get install libportaudio2)
        raise UserError(no_microphone) from None
    try:
        sounddevice.query_devices(kind="input")
    except (sounddevice.PortAudioError, ValueError):
        raise UserError(no_microphone) from None
    if not args.json:
        print(f"recording {args.seconds:g} s ...", file=sys.stderr)
    recording = sounddevice.rec(int(args.seconds * SAMPLE_RATE), samplerate=SAMPLE_RATE, channels=1, dtype="float32")
    sounddevice.wait()
    started = time.perf_counter()
    return _audio_answer(args, read_audio(recording[:, 0], rate=SAMPLE_RATE), started)


VERBS = {
    "dictate": cmd_dictate,
    "info": cmd_info,
    "inspect": cmd_inspect,
    "phantom": cmd_phantom,
    "retrieve": cmd_retrieve,
    "zeroshot": cmd_zeroshot,
    "index": cmd_index,
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m engine", description="Chest-CT engine: I/O, phantom, CT CLIP and its flows.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of unexpected errors")
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    def verb(name, help_):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
        p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
        return p

    verb("info", "versions, conventions and the models the engine has")
    p = verb("inspect", "describe a CT (shape, spacing, orientation, HU range, chest CT or not), a radiograph or audio")
    p.add_argument("--ct", help="NIfTI / NRRD / MHA file, DICOM folder, DICOM .zip or one .dcm slice")
    p.add_argument("--cxr", help="chest radiograph: PNG, JPEG or DICOM")
    p.add_argument("--audio", help="recording: WAV, FLAC, OGG or WebM/Opus")
    p = verb("phantom", "write one digital chest phantom study (NIfTI) with its CT-RATE-style report")
    p.add_argument("--labels", default=None,
                   help='comma-separated CT-RATE labels, e.g. "Pleural effusion,Cardiomegaly"; "" for a normal '
                        "study; omitted: sampled from CT-RATE's label table")
    p.add_argument("--seed", type=int, default=0, help="the phantom's seed (anatomy, finding sites, noise)")
    p.add_argument("--out", required=True, help="output .nii.gz")

    def model_options(p):
        p.add_argument("--preset", choices=("demo", "paper"), default="demo", help="model preset (default demo)")
        p.add_argument("--weights", default=None, help="checkpoint folder (default: the shipped demo checkpoint)")

    p = verb("retrieve", "find the library CTs that best match a report, typed or dictated")
    p.add_argument("--text", help="report text or a short query ('right pleural effusion')")
    p.add_argument("--audio", help="a dictated report: WAV, FLAC, OGG, MP3 or WebM/Opus, any rate (speech encoder)")
    p.add_argument("--speech-weights", default=None, help="speech encoder folder (default assets/speech)")
    p.add_argument("--k", type=int, default=10, help="how many studies to return (default 10)")
    p.add_argument("--library", default=None, help="the user's library folder (default ~/.local/share/ct-workstation)")
    model_options(p)
    p = verb("dictate", "record a report from the local microphone and retrieve the matching CTs")
    p.add_argument("--seconds", type=float, default=30.0, help="recording length in seconds (default 30)")
    p.add_argument("--k", type=int, default=10, help="how many studies to return (default 10)")
    p.add_argument("--library", default=None, help="the user's library folder (default ~/.local/share/ct-workstation)")
    p.add_argument("--speech-weights", default=None, help="speech encoder folder (default assets/speech)")
    model_options(p)
    p = verb("zeroshot", "probability of each of the 18 CT-RATE findings in a CT")
    p.add_argument("--ct", required=True, help="NIfTI / NRRD / MHA file, DICOM folder, DICOM .zip or one .dcm slice")
    model_options(p)
    p = verb("index", "add CTs to the user's searchable library (idempotent)")
    p.add_argument("--ct", required=True, nargs="+", help="CT files, DICOM folders or zips")
    p.add_argument("--library", default=None, help="the user's library folder (default ~/.local/share/ct-workstation)")
    model_options(p)
    return parser


def _print_human(result: dict) -> None:
    for key, value in result.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        print(f"{key}: {value}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        result = VERBS[args.verb](args)
        if as_json:
            print(json.dumps(result))
        else:
            _print_human(result)
        return 0
    except UserError as err:
        return _fail(str(err), 2, as_json)
    except KeyboardInterrupt:
        return _fail("Interrupted.", 130, as_json)
    except BrokenPipeError:  # the reader went away (e.g. `| head`): nothing left to tell anyone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as err:  # a bug, not bad input: still one sentence for the user
        if debug:
            raise
        return _fail(f"Internal error ({type(err).__name__}); rerun with --debug for details.", 1, as_json)


def _fail(message: str, status: int, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"error": message}))
    else:
        print(f"error: {message}", file=sys.stderr)
    return status
