"""Checks on a user's query text, before any model is loaded: bad queries answer at once with one sentence."""
from __future__ import annotations

from engine.errors import UserError

MAX_QUERY_CHARS = 20_000  # a long CT-RATE report is ~8,000 characters; 100 kB of text is not a report


def check_query_text(text: str) -> str:
    """A query must be English report text of sensible length: one clear sentence otherwise."""
    if text is None or not str(text).strip():
        raise UserError("The query is empty: type or paste a report, or a few words such as 'right pleural effusion'.")
    text = " ".join(str(text).split())
    if len(text) > MAX_QUERY_CHARS:
        raise UserError(f"The query is {len(text):,} characters long; a report is at most {MAX_QUERY_CHARS:,}.")
    letters = [c for c in text if c.isalpha()]
    if not letters:
        raise UserError("The query has no words: type or paste report text.")
    latin = sum(c.isascii() for c in letters) / len(letters)
    if latin < 0.8:
        raise UserError("The query does not look like English text; the models read English radiology reports.")
    return text
