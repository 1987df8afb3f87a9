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
            "rms_dbfs": round(rms_dbfs(audio.samples), 2), "windows_30s": len(split_windows(audio.samples)),
            "warnings": list(audio.warnings)}


def cmd_phantom(args) -> dict:
    from engine.labels import label_dict, parse_label_list

    try:
        labels = parse_label_list(args.labels) if args.labels is not None else None
    except ValueError as err:
        raise UserError(str(err)) from None
    if args.seed < 0:  # the phantom's random streams come from np.random.SeedSequence: any whole number >= 0
        raise UserError(f"The seed (--seed) must be a whole number of 0 or more, not {args.seed}.")
    from engine.volume import check_output_path, write_nifti

    out = check_output_path(args.out)  # before the phantom is drawn: a bad path answers at once
    from engine.phantom import make_study

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

    if (args.text is None) == (args.audio is None):      # an empty --text "" is a query, refused as empty below
        raise UserError("Give exactly one of --text or --audio.")
    if args.audio is not None:
        return retrieve_audio(args)
    text = check_query_text(args.text)  # before loading any model: bad queries answer at once
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
    findings, check = pipeline.zero_shot_checked(volume)
    # in_distribution / ood_score: engine/ood.py (ood_score = Mahalanobis distance / calibrated threshold; null when
    # the checkpoint has no latent statistics); a flagged scan's answer says so in one more warning
    # held_out_auroc: how well each label was read on the checkpoint's held-out test ({} when it has no metrics.json)
    return {"findings": findings, **check.to_json(), "held_out_auroc": pipeline.zero_shot_auroc,
            "model_id": pipeline.model_id, "warnings": volume.warnings + ([check.warning] if check.flagged else []),
            "elapsed_s": round(time.perf_counter() - started, 4)}


def cmd_index(args) -> dict:
    from engine.ood import UNKNOWN
    from engine.study_library import user_library_folder

    user_library_folder(args.library)
    for path in args.ct:  # before loading any model: a missing file answers at once
        if not os.path.lexists(path):
            raise UserError(f"The CT file or folder {Path(path).name!r} does not exist.")
    pipeline = _pipeline(args)
    library = _library(args, pipeline)
    added = []
    for path in args.ct:
        sid, new = library.index_file(path)  # each file commits on its own: an interrupted run keeps what it did
        study = library.user_index.get(sid)  # the warnings of the reading were stored with the study
        warnings = list((study.meta or {}).get("warnings", [])) if study is not None else []
        check = pipeline.distribution_check(study.embedding) if study is not None else UNKNOWN   # engine/ood.py
        added.append({"id": sid, "path": str(Path(path).resolve()), "added": new, **check.to_json(),
                      "warnings": warnings + ([check.warning] if check.flagged else [])})
    return {"indexed": added, "library": str(library.user_dir), "size": len(library.user_index),
            "model_id": pipeline.model_id}


# ---- generate (Text2CT, issue 15): the verb and its parser lines, kept together ----------------------------------

def cmd_generate(args) -> dict:
    """A synthetic CT from a report: {"path", "shape" (x, y, z), "spacing" (x, y, z) mm, "orientation", "elapsed_s",
    "findings" (the CT CLIP's reading of the generated volume), "asked" (the prompt's own label probabilities),
    "synthetic": true, "seed", "steps", "guidance", "timings_s", "model_id"}; with --toggle LABEL also "toggle" (the
    same seed with that finding toggled in the prompt: `_toggle_answer`)."""
    from engine.pipelines.generate import DEFAULT_GUIDANCE, check_guidance, check_seed, check_steps, \
        write_synthetic_nifti
    from engine.query import check_query_text
    from engine.report_edit import check_finding_label

    text = check_query_text(args.text)  # every input checked before any model loads
    steps = None if args.steps is None else check_steps(args.steps)
    guidance = check_guidance(DEFAULT_GUIDANCE if args.guidance is None else args.guidance)
    seed = check_seed(args.seed)
    label = None if args.toggle is None else check_finding_label(args.toggle)
    out = Path(args.out)
    if not out.name.lower().endswith((".nii", ".nii.gz")) or not out.parent.is_dir():
        raise UserError(f"--out must be a .nii.gz or .nii file in an existing folder, not {args.out!r}.")
    started = time.perf_counter()
    from engine.pipelines.generate import GeneratePipeline

    pipeline = GeneratePipeline.from_pretrained(args.weights, preset=args.preset)
    comparison = None
    if label is None:
        result = pipeline.generate(text, steps=steps, guidance=guidance, seed=seed)
    else:
        comparison = pipeline.compare_finding(text, label, steps=steps, guidance=guidance, seed=seed)
        result = comparison.prompt
    path = write_synthetic_nifti(result.volume, out)
    reading = pipeline.read(result.volume, result.text_latent) or {}
    answer = {"path": str(path.resolve()), "shape": list(result.volume.shape_xyz),
              "spacing": [round(s, 6) for s in result.volume.spacing], "orientation": "LPS", "synthetic": True,
              "elapsed_s": None, "findings": reading.get("findings"), "asked": reading.get("asked"), "seed": seed,
              "steps": result.steps, "guidance": result.guidance, "timings_s": result.timings_s,
              "model_id": pipeline.model_id}
    if comparison is not None:
        answer["toggle"] = _toggle_answer(pipeline, comparison, out)
    answer["elapsed_s"] = round(time.perf_counter() - started, 4)
    return answer


def _toggle_answer(pipeline, comparison, out: Path) -> dict:
    """generate --toggle: {"label", "added" (true: the prompt did not state it), "text" (the toggled prompt), "path"
    (its volume, written beside --out as NAME_with_LABEL / NAME_without_LABEL), "findings", "asked" (as for the
    prompt), "difference_hu": {"mean_abs", "max_abs", "share_over_100"} of with - without}."""
    import numpy as np

    from engine.pipelines.generate import write_synthetic_nifti

    toggled = comparison.toggled
    stem, suffix = (out.name[:-7], ".nii.gz") if out.name.lower().endswith(".nii.gz") else (out.stem, out.suffix)
    slug = comparison.label.lower().replace(" ", "_")
    name = f"{stem}_{'with' if comparison.added else 'without'}_{slug}{suffix}"
    path = write_synthetic_nifti(toggled.volume, out.with_name(name))
    reading = pipeline.read(toggled.volume, toggled.text_latent) or {}
    difference = np.abs(comparison.difference_hu)
    return {"label": comparison.label, "added": comparison.added, "text": toggled.text, "path": str(path.resolve()),
            "findings": reading.get("findings"), "asked": reading.get("asked"),
            "difference_hu": {"mean_abs": round(float(difference.mean()), 3),
                              "max_abs": round(float(difference.max()), 3),
                              "share_over_100": round(float((difference >= 100).mean()), 5)}}


def add_generate_parser(verb) -> None:
    p = verb("generate", "generate a synthetic CT volume (NIfTI) from a report")
    p.add_argument("--text", required=True, help='report text, e.g. "Findings: ... Impression: ..."')
    p.add_argument("--out", required=True, help="output .nii.gz")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, 15 for the demo)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 5.0)")
    p.add_argument("--seed", type=int, default=0, help="the seed: the same seed gives the same volume")
    p.add_argument("--toggle", default=None, metavar="LABEL", help="also generate the prompt with this finding (one "
                   "of the 18 labels) toggled, from the same seed: added if absent, removed if present")
    p.add_argument("--preset", choices=("demo", "paper"), default="demo", help="model preset (default demo)")
    p.add_argument("--weights", default=None, help="generator folder (default: assets/generator; paper: a folder "
                   "with Text2CT's official files)")

# ---- end of generate ----------------------------------------------------------------------------------------------


# ---------------------------------------------------------------- chest radiographs (X2CT-CLIP): drr, findings

def cmd_drr(args) -> dict:
    from engine.drr import simulate_radiograph, write_png
    from engine.volume import read_ct

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError("--out must be a .png file.")
    if not out.parent.is_dir():
        raise UserError(f"The folder of --out ({out.parent}) does not exist.")
    started = time.perf_counter()
    volume = read_ct(args.ct)
    radiograph = simulate_radiograph(volume, view=args.view)
    write_png(radiograph, out)
    return {"path": str(out.resolve()), "view": args.view, "shape": list(radiograph.image.shape),
            "pixel_mm": list(radiograph.pixel_spacing_mm), "warnings": volume.warnings,
            "elapsed_s": round(time.perf_counter() - started, 4)}


def cmd_findings(args) -> dict:
    from engine.radiograph import read_radiograph
    from engine.radiograph_view import check_frontal_chest
    from engine.study_library import user_library_folder

    radiograph = read_radiograph(args.cxr)   # before loading any model: a bad file answers at once
    check_frontal_chest(radiograph)          # a CT slice or a lateral view too
    if args.k < 1 or args.k > 1000:
        raise UserError("--k must be between 1 and 1000.")
    user_library_folder(args.library)
    from engine.pipelines.cxr import CXRPipeline, cxr_model_dir

    weights = cxr_model_dir(args.cxr_weights)    # a missing model: one sentence before the CT CLIP loads
    started = time.perf_counter()
    ctclip = _pipeline(args)
    pipeline = CXRPipeline.from_pretrained(weights, ctclip=ctclip)
    latent = pipeline.embed_radiograph(radiograph)
    similar = _library(args, ctclip).search(latent, k=args.k)
    return {"findings": ctclip.zero_shot_from_latent(latent), "similar": [r.to_json() for r in similar],
            "held_out_auroc": pipeline.zero_shot_auroc,     # the X-ray encoder's own held-out figures
            "model_id": ctclip.model_id, "warnings": radiograph.warnings,
            "elapsed_s": round(time.perf_counter() - started, 4)}


X2CT_VERBS = {"drr": cmd_drr, "findings": cmd_findings}


def add_x2ct_parsers(verb, model_options) -> None:
    p = verb("drr", "simulate a chest radiograph (DRR) from a CT and write it as a PNG")
    p.add_argument("--ct", required=True, help="NIfTI / NRRD / MHA file, DICOM folder, DICOM .zip")
    p.add_argument("--out", required=True, help="output .png")
    p.add_argument("--view", choices=("pa", "ap"), default="pa", help="projection (default pa)")
    p = verb("findings", "the 18 CT-level findings and the most similar CT studies from a chest radiograph")
    p.add_argument("--cxr", required=True, help="chest radiograph: PNG, JPEG or DICOM")
    p.add_argument("--k", type=int, default=10, help="how many similar studies to return (default 10)")
    p.add_argument("--library", default=None, help="the user's library folder (default ~/.local/share/ct-workstation)")
    p.add_argument("--cxr-weights", default=None, help="chest X-ray encoder folder (default assets/x2ct)")
    model_options(p)

# ------------------------------------------------------------------------------------ end of the chest radiographs


# ------------------------------------------------------------------------- speech (issue 13): retrieve --audio, dictate

def _speech_pipeline(args):
    from engine.pipelines.speech import SpeechPipeline

    folder = SpeechPipeline.checkpoint_dir(getattr(args, "speech_weights", None))   # refused before the CT CLIP loads
    return SpeechPipeline.from_pretrained(folder, ctclip=_pipeline(args))


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
    "generate": cmd_generate,
    **X2CT_VERBS,
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
    add_generate_parser(verb)
    add_x2ct_parsers(verb, model_options)
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
        _check_numbers(args)
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


def _check_numbers(args) -> None:
    """Range checks argparse cannot express, shared by every verb (a bad number is bad input: exit 2)."""
    k = getattr(args, "k", None)
    if k is not None and not 1 <= k <= 1000:
        raise UserError(f"The number of results (--k) must be between 1 and 1000, not {k}.")


def _fail(message: str, status: int, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"error": message}))
    else:
        print(f"error: {message}", file=sys.stderr)  # stderr escapes undecodable bytes (backslashreplace)
    return status
