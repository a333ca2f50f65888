"""Per-step timing of a rotation, read from outside the agent.

The agent records each crash point it reaches into the file that
CERTROTATE_TRACE_POINTS names (docs/contracts.md, "Agent crash hooks"). Here
that file is a FIFO whose reader stamps each line as it arrives, so the
breakdown comes from the real agent binary without changing it; the points are
named "<step>:<action>".
"""

from __future__ import annotations

import os
import select
import threading
import time
from pathlib import Path


class PointClock:
    """A FIFO the agent writes crash point names into; each name is stamped
    with time.perf_counter() on arrival."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / "trace-points.fifo"
        os.mkfifo(self.path, 0o600)
        self._read_fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        # Our own writer keeps the FIFO open between the agent's writes, so
        # the reader never sees end-of-file when the agent closes it.
        self._keep_fd = os.open(self.path, os.O_WRONLY)
        self._stop_r, self._stop_w = os.pipe()
        self._lock = threading.Lock()
        self._points: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        pending = b""
        while True:
            ready, _, _ = select.select([self._read_fd, self._stop_r], [], [])
            stamp = time.perf_counter()
            if self._stop_r in ready:
                return
            pending += os.read(self._read_fd, 65536)
            *lines, pending = pending.split(b"\n")
            with self._lock:
                self._points.extend((stamp, line.decode()) for line in lines if line)

    def take(self) -> list[tuple[float, str]]:
        """The points stamped since the last call."""
        time.sleep(0.01)  # let the reader drain what the agent wrote just before exiting
        with self._lock:
            points, self._points = self._points, []
        return points

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join()
        for fd in (self._read_fd, self._keep_fd, self._stop_r, self._stop_w):
            os.close(fd)
        self.path.unlink()


# The journal save and the queued event that close each step are named
# "journal:<step>" and "event:<step>": they count for that step.
BOOKKEEPING = ("journal", "event")
STEP_ALIASES = {"start": "started"}


def step_of(point: str) -> str:
    head, _, rest = point.partition(":")
    if head in BOOKKEEPING and rest:
        step = rest.split(":", 1)[0]
        return STEP_ALIASES.get(step, step)
    return head


def breakdown(started: float, points: list[tuple[float, str]], exited: float) -> dict[str, float]:
    """Seconds per phase: "startup" (spawn to the first point: interpreter,
    imports, configuration), then per step the time leading up to each of its
    points (a point marks work just persisted or a reply just received, so
    the time before it is that step's), then "exit" (last point to exit)."""
    if not points:
        return {"startup+all": exited - started}
    phases: dict[str, float] = {"startup": points[0][0] - started}
    for (before, _), (stamp, name) in zip(points, points[1:]):
        step = step_of(name)
        phases[step] = phases.get(step, 0.0) + (stamp - before)
    phases["exit"] = exited - points[-1][0]
    return phases
