"""The Gradio front end: layout, the CT viewer and event wiring. Imports engine only, never model code."""
from app.ui import AppConfig, build_app

__all__ = ["AppConfig", "build_app"]
