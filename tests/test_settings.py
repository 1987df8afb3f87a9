"""Asset paths and environment defaults are read when asked (engine/settings.py), not frozen at import."""
from __future__ import annotations

from pathlib import Path

from engine import settings


def test_environment_is_read_at_call_time(monkeypatch, tmp_path):
    monkeypatch.delenv("CT_CTCLIP_DIR", raising=False)
    assert settings.ctclip_dir() == settings.ASSETS / "ctclip"
    assert (settings.ctclip_dir() / "preprocessing.json").is_file()   # the shipped folder describes its input
    monkeypatch.setenv("CT_CTCLIP_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setenv("CT_LIBRARY_EMBEDDINGS", str(tmp_path / "latents.safetensors"))
    monkeypatch.setenv("CT_WORKSTATION_LIBRARY", str(tmp_path / "lib"))
    assert settings.ctclip_dir() == tmp_path / "ckpt"
    assert settings.library_embeddings() == tmp_path / "latents.safetensors"
    assert settings.user_library_dir() == tmp_path / "lib"
    monkeypatch.delenv("CT_WORKSTATION_LIBRARY")
    assert settings.user_library_dir() == Path.home() / ".local" / "share" / "ct-workstation"


def test_info_follows_the_checkpoint_setting(monkeypatch, tmp_path):
    from engine.info import models_info

    monkeypatch.setenv("CT_CTCLIP_DIR", str(tmp_path / "none"))
    assert models_info() == {"models": {}}          # nothing installed there: no entry, no error
    monkeypatch.delenv("CT_CTCLIP_DIR")
    entry = models_info()["models"]["ctclip"]
    assert entry["preset"] == "demo" and entry["model_id"].startswith("ctclip-")
