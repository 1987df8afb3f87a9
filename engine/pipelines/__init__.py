"""Pipelines, one file per flow, all following base.py's convention (seed, progress, cancel):
ctclip.py (CTClipPipeline: CT and report latents, zero-shot reading, heat map)."""
