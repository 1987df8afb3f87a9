"""The "Open a CT" tab: upload a CT file (NIfTI, NRRD, MHA/MHD, a DICOM .zip or one .dcm) and view it."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from app.viewer import ct_viewer
from app.zeroshot_panel import read_findings, zeroshot_panel
from engine.errors import UserError
from engine.volume import read_ct

FORMATS = "NIfTI (.nii, .nii.gz), NRRD, MHA/MHD, a DICOM series as .zip, or one DICOM slice (.dcm)"


def load_upload(path):
    """Read the uploaded file with engine.volume.read_ct; bad input becomes one sentence in a notification."""
    if not path:
        raise gr.Error("Choose a CT file to upload.", print_exception=False)
    try:
        volume = read_ct(path)
    except UserError as err:
        raise gr.Error(str(err), print_exception=False) from None
    except Exception:  # a reader failure that is not a known bad input: still one sentence, never a traceback
        raise gr.Error(f"The file {Path(path).name!r} could not be read as a CT ({FORMATS}).",
                       print_exception=False) from None
    volume.source = Path(path).name
    for warning in volume.warnings:
        gr.Warning(warning)
    return volume


def open_tab(models=None, max_upload_mb: int | None = None):
    """Build the tab's content in the current context. With `models` (app.models.CTClipModels) the CT CLIP
    reads the uploaded CT's 18 findings as soon as its planes are shown. Returns the tab's CTViewer."""
    limit = f" (up to {max_upload_mb} MB)" if max_upload_mb else ""
    gr.Markdown(f"Upload one chest CT{limit}: {FORMATS}. It stays on the server that runs this app, visible only to "
                "this browser, and is deleted with the server's temporary files."
                + (" The CT CLIP then reads its 18 findings (below the viewer)." if models is not None else ""))
    upload = gr.File(label="CT file", file_count="single", type="filepath", height=120,
                     elem_classes=["ct-upload"])
    viewer = ct_viewer()
    opened = viewer.open_after(upload.upload(load_upload, upload, viewer.volume, api_name="read_ct_upload"))
    if models is not None:
        panel = zeroshot_panel()
        opened.success(lambda volume: read_findings(models, volume), viewer.volume, panel.outputs,
                       show_progress="hidden")
    return viewer
