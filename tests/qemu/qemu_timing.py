"""Durations of the QEMU run's stages, printed in the session summary."""

from __future__ import annotations

import time
from contextlib import contextmanager

stages: list[tuple[str, float]] = []
started: float | None = None  # when the first QEMU fixture set up


def record_stage(name: str, seconds: float) -> None:
    stages.append((name, seconds))


@contextmanager
def stage(name: str):
    """Time a stage of the QEMU run."""
    started = time.monotonic()
    try:
        yield
    finally:
        record_stage(name, time.monotonic() - started)
