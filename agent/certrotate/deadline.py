"""Deadlines on a monotonic clock, passed in like the rest of the agent's I/O.

requests' timeout bounds each read, not a whole reply: a server that sends a
byte every few seconds would keep a run (and its lock) alive for ever. A run
has one ``Deadline``; each request gets a shorter one ``within`` it.
"""

from __future__ import annotations

import time
from typing import Callable


class Deadline:
    """The moment ``seconds`` after its creation on ``clock``; None seconds: never."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self.clock = clock
        self.at = None if seconds is None else clock() + seconds

    def left(self) -> float:
        """Seconds until the deadline (infinite without one; 0 or less once it has passed)."""
        return float("inf") if self.at is None else self.at - self.clock()

    def passed(self) -> bool:
        return self.left() <= 0

    def within(self, seconds: float) -> "Deadline":
        """A deadline ``seconds`` from now on the same clock, or this one if it comes first."""
        sooner = Deadline(seconds, self.clock)
        if self.at is not None and self.at < sooner.at:
            sooner.at = self.at
        return sooner
