"""Asset paths and environment defaults, read in this one place and only when asked (never at import), so a test or
a caller that sets an environment variable after importing the engine is still heard.

    CT_CTCLIP_DIR            the CT CLIP checkpoint folder (default assets/ctclip)
    CT_LIBRARY_EMBEDDINGS    the demo library's latents made with it (default assets/library/ctclip_embeddings...)
    CT_WORKSTATION_LIBRARY   the user's own indexed CTs (default ~/.local/share/ct-workstation)
    CT_X2CT_DIR              the chest-radiograph (X2CT-CLIP) encoder folder (default assets/x2ct)
    CT_SHARED_DATA           the real data used by training and tests (default ../shared/data beside the checkout)
    CT_GENERATOR_DIR         the demo generator (vae/ and unet/ checkpoint folders; default assets/generator)
    CT_WORKSTATION_CACHE     files made once and reused (default ~/.cache/ct-workstation): converted Whisper, voices
    CT_SPEECH_DIR            the speech encoder checkpoint folder (default assets/speech)
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"


def _path(variable: str, default: Path) -> Path:
    return Path(os.environ.get(variable) or default)


def ctclip_dir() -> Path:
    """The shipped demo CT CLIP checkpoint ($CT_CTCLIP_DIR points elsewhere, e.g. at a checkpoint being trained)."""
    return _path("CT_CTCLIP_DIR", ASSETS / "ctclip")


def x2ct_dir() -> Path:
    """The chest-radiograph encoder checkpoint ($CT_X2CT_DIR; default assets/x2ct, written from a run's model/ by
    `python -m training x2ct`)."""
    return _path("CT_X2CT_DIR", ASSETS / "x2ct")


def library_embeddings() -> Path:
    """The demo library's latents made with ctclip_dir()'s checkpoint ($CT_LIBRARY_EMBEDDINGS)."""
    return _path("CT_LIBRARY_EMBEDDINGS", ASSETS / "library" / "ctclip_embeddings.safetensors")


def library_studies() -> Path:
    """The demo library's study list (seeds, labels, reports), written by training/build_library.py."""
    return ASSETS / "library" / "studies.json"


def user_library_dir() -> Path:
    """The user's own indexed CTs ($CT_WORKSTATION_LIBRARY)."""
    return _path("CT_WORKSTATION_LIBRARY", Path.home() / ".local" / "share" / "ct-workstation")


def phantom_label_sets() -> Path:
    """The phantom's compact CT-RATE label table."""
    return ASSETS / "phantom" / "label_sets.json"


def shared_data() -> Path:
    """Real CTs, reports, radiographs and label tables outside the repository ($CT_SHARED_DATA)."""
    return _path("CT_SHARED_DATA", ROOT.parent / "shared" / "data")


def training_runs_dir() -> Path:
    """Where `python -m training` writes its runs."""
    return ROOT / "runs"


def training_cache_dir() -> Path:
    """Where `python -m training` keeps its rendered phantom caches."""
    return ROOT / "cache"


def generator_dir() -> Path:
    """The demo generator: DIR/vae and DIR/unet checkpoint folders ($CT_GENERATOR_DIR; default assets/generator)."""
    return _path("CT_GENERATOR_DIR", ASSETS / "generator")


def user_cache_dir() -> Path:
    """Files the engine makes once and reuses ($CT_WORKSTATION_CACHE, default $XDG_CACHE_HOME/ct-workstation or
    ~/.cache/ct-workstation): converted Whisper weights, the Kokoro voice pack, synthesised speech."""
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return _path("CT_WORKSTATION_CACHE", Path(xdg) / "ct-workstation")


def whisper_cache_dir(name: str) -> Path:
    """The converted offline Whisper `name` ("tiny.en", "base") in the transformers layout, made once by
    engine/convert/whisper.py."""
    return user_cache_dir() / "whisper" / name


def speech_dir() -> Path:
    """The speech encoder checkpoint folder ($CT_SPEECH_DIR, default assets/speech)."""
    return _path("CT_SPEECH_DIR", ASSETS / "speech")
