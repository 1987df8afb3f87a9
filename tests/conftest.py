"""Shared test fixtures: real data from ../shared/data (never copied into the project)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CT_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA} (set CT_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def lung1_path(shared_data) -> Path:
    return shared_data / "ct" / "lung1_image.nii.gz"
