"""What `python -m engine info` reports about the trained models that are installed."""
from __future__ import annotations

import json


def models_info() -> dict:
    """{"models": {name: {"path", "preset", "model_id"[, "metrics"]}}} for each installed checkpoint."""
    from engine.pipelines.ctclip import model_id
    from engine.settings import ctclip_dir

    info = {"models": {}}
    directory = ctclip_dir()
    if (directory / "config.json").is_file():
        config = json.loads((directory / "config.json").read_text())
        entry = {"path": str(directory), "preset": config.get("preset"), "model_id": model_id(directory)}
        metrics = directory / "metrics.json"
        if metrics.is_file():
            entry["metrics"] = json.loads(metrics.read_text())
        info["models"]["ctclip"] = entry
    return info
