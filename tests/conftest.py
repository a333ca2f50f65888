"""Shared fixtures. `backend`: a started reference backend (tests/backend.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from backend import Backend  # noqa: E402


@pytest.fixture
def backend(tmp_path):
    server = Backend(tmp_path / "factory")
    server.start()
    try:
        yield server
    finally:
        server.stop()
