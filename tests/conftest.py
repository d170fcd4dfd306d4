"""Shared fixtures: the real data set beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, read-only. Under CI=true its absence is a failure, never a skip."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the real data set is missing at {SHARED_DATA}")
        pytest.skip(f"real data set not found at {SHARED_DATA}")
    return SHARED_DATA
