"""CT engine: imaging I/O, the digital chest phantom, the CT CLIP trunk and the pipelines built on it.

Conventions used everywhere in the engine:
- CT arrays are indexed (z, y, x) in LPS orientation: +x = patient's left, +y = posterior, +z = head.
- Spacing, origin and shapes reported to users follow SimpleITK: (x, y, z), millimetres.
- Intensities are Hounsfield units (HU) unless a function says otherwise.
This package imports neither gradio nor training.
"""
from engine.errors import UserError
from engine.labels import LABELS, Finding

__all__ = ["LABELS", "Finding", "UserError"]
