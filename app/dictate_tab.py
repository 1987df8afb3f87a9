"""The "Dictate" tab: speak a report (browser microphone) or upload a recording; the closest CTs update while you
speak, and the 18 findings are read from the speech itself (the speech encoder's latent against the CT CLIP's cached
label prompts; no speech recognition involved).

Streaming: the microphone sends chunks every STREAM_EVERY_S seconds; the recording so far is converted to 16 kHz
(engine.audio.read_audio) and, once UPDATE_EVERY_S new seconds have arrived, re-embedded by
engine.pipelines.speech.Dictation (finished 30 s windows cached, only the last one encoded) and re-ranked. Stopping
the recording (or uploading a file) gives the final ranking. A result opens in the shared viewer.
"""
from __future__ import annotations

import gradio as gr
import numpy as np
import pandas as pd

from app.find_tab import (COLUMNS, open_clicked_results, results_table,
                          show_model_status)
from app.models import CTClipModels, SpeechModels
from app.viewer import ct_viewer
from app.zeroshot_panel import SPEECH_READING_SUBTITLE, text_reading_title, zero_shot_figure
from engine.errors import UserError

STREAM_EVERY_S = 1.0
DEFAULT_K = 10
LISTENING = "Press the microphone and dictate a report; the closest CTs appear after the first 3 s of speech."


def _fail(err: UserError):
    return gr.Error(str(err), print_exception=False)


def new_session() -> dict:
    """Per-browser state: the raw microphone chunks (their rate), the Dictation, the results on show."""
    return {"rate": None, "chunks": [], "dictation": None}


def _rank(speech: SpeechModels, ctclip: CTClipModels, latent: np.ndarray, k: int):
    found = [r.to_json() for r in ctclip.library().search(latent, int(k))]
    pipeline = speech.pipeline()
    figure = zero_shot_figure(pipeline.findings(latent),
                              title=text_reading_title(pipeline.ctclip.text_reader is not None, spoken=True),
                              subtitle=SPEECH_READING_SUBTITLE)
    return results_table(found, ctclip.library()), found, figure


def on_chunk(chunk, session, k, speech: SpeechModels, ctclip: CTClipModels, final: bool = False):
    """A microphone chunk (rate, int16 array) -> (table, results, figure, status, session); gr.skip() for the
    outputs when no new ranking is due (less than UPDATE_EVERY_S new seconds)."""
    from engine.audio import read_audio
    from engine.pipelines.speech import Dictation

    session = session or new_session()
    if chunk is not None and not final:
        rate, array = chunk
        if session["rate"] not in (None, rate):
            session = new_session()
        session["rate"] = rate
        session["chunks"].append(np.asarray(array))
    if not session["chunks"]:
        return gr.skip(), gr.skip(), gr.skip(), LISTENING, session
    try:
        if session["dictation"] is None:
            session["dictation"] = Dictation(speech.pipeline())
        dictation = session["dictation"]
        samples = read_audio((session["rate"], np.concatenate(session["chunks"]))).samples
    except UserError as err:
        return gr.skip(), gr.skip(), gr.skip(), f"Listening… ({err})", session
    dictation.samples = samples
    latent = dictation.update(force=final)
    if latent is None:
        return gr.skip(), gr.skip(), gr.skip(), f"Listening… {dictation.seconds:.0f} s", session
    table, found, figure = _rank(speech, ctclip, latent, k)
    state = "Final ranking" if final else "Ranking while you speak"
    return table, found, figure, f"{state}: {dictation.seconds:.1f} s of dictation.", session


def on_upload(recording, k, speech: SpeechModels, ctclip: CTClipModels):
    """A whole recording (uploaded, or the microphone's when streaming is off) -> the final ranking."""
    from engine.audio import read_audio
    from engine.pipelines.speech import dictation_warnings

    if recording is None:
        return gr.skip(), gr.skip(), gr.skip(), LISTENING
    try:
        audio = read_audio(recording)
        latent = speech.pipeline().embed_audio(audio)
        table, found, figure = _rank(speech, ctclip, latent, k)
    except UserError as err:
        raise _fail(err) from None
    notes = " ".join(dictation_warnings(audio))
    return table, found, figure, f"Final ranking: {audio.seconds:.1f} s of dictation. {notes}".strip()


def dictate_tab(ctclip: CTClipModels, speech: SpeechModels, demo: gr.Blocks | None = None):
    gr.Markdown("Dictate a report as you would for a chest CT. The speech encoder puts your voice straight into the "
                "CT CLIP's space (no transcription) and ranks every CT in the library while you speak.")
    with gr.Row(equal_height=False):
        audio = gr.Audio(sources=["microphone", "upload"], type="numpy", streaming=True, label="Dictation",
                         scale=3, elem_id="dictate-audio")
        k = gr.Slider(1, 50, value=DEFAULT_K, step=1, label="CTs to show (K)", scale=1)
    status = gr.Markdown(LISTENING, elem_id="dictate-status")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            table = gr.Dataframe(pd.DataFrame(columns=COLUMNS), interactive=False, wrap=False, max_height=330,
                                 label="Closest CTs (click a row to open it)", elem_id="dictate-results")
        with gr.Column(scale=2):
            findings = gr.Plot(label="What the dictation says (read from the speech, not a transcript)",
                               show_label=False, elem_id="dictate-findings")  # the figure's title says it
    viewer = ct_viewer()
    report = gr.Markdown("")
    session = gr.State(None)
    results = gr.State([])

    def chunk(c, s, kk):
        return on_chunk(c, s, kk, speech, ctclip)

    def stop(s, kk):
        return on_chunk(None, s, kk, speech, ctclip, final=True)

    outputs = [table, results, findings, status, session]
    audio.stream(chunk, [audio, session, k], outputs, stream_every=STREAM_EVERY_S, time_limit=600,
                 concurrency_limit=4, show_progress="hidden")
    audio.stop_recording(stop, [session, k], outputs, show_progress="hidden")
    audio.start_recording(lambda: new_session(), None, session, show_progress="hidden")
    audio.upload(lambda r, kk: on_upload(r, kk, speech, ctclip), [audio, k], [table, results, findings, status])

    open_clicked_results(ctclip, table, results, viewer, report)
    if demo is not None:
        show_model_status(demo, speech, LISTENING, status)
    return viewer
