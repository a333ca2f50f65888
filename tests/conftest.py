"""Shared fixtures. `backend`: a started reference backend (tests/backend.py), one per
test; `module_backend`: one shared by a module's tests (each registers its own devices)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from backend import Backend  # noqa: E402


def _started(directory: Path):
    server = Backend(directory / "factory")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def backend(tmp_path):
    yield from _started(tmp_path)


@pytest.fixture(scope="module")
def module_backend(tmp_path_factory):
    yield from _started(tmp_path_factory.mktemp("module-backend"))
