"""Bounds on what wrong EST passwords cost the server.

A wrong password always runs scrypt (16 MiB, ~50 ms): without a bound, a burst
of guesses takes the server's memory with it. So at most a few checks run at
once, always in the same few threads (the rest wait briefly, then get a 503 with
Retry-After), and a client
address with repeated failures is told to wait (429) without a check at all.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from .httpbase import HttpError

CONCURRENT_CHECKS = 2
QUEUE_WAIT_SECONDS = 1.0
FAILURES_ALLOWED = 5  # per client address and window
FAILURE_WINDOW_SECONDS = 60
TRACKED_CLIENTS = 10_000  # the oldest are forgotten beyond this


class PasswordGuard:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._slots = threading.BoundedSemaphore(CONCURRENT_CHECKS)
        # Dedicated threads: glibc keeps a freed 16 MiB block resident in the arena
        # of the thread that used it, so scrypt in every connection thread would
        # leave that much behind per arena (measured: +234 MiB after 128 guesses).
        self._threads = ThreadPoolExecutor(CONCURRENT_CHECKS, thread_name_prefix="password-check")
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, tuple[float, int]] = OrderedDict()  # client -> (window start, count)

    def check(self, client: str, known: Callable[[], bool], verify: Callable[[], bool]) -> bool:
        """Whether the credentials are good: ``known()`` (cheap: the password already
        verified) or else ``verify()`` (scrypt), under the bounds; HttpError 429/503
        when refused. A client being made to wait is refused first, even with the
        right password: the cheap check must not become a fast oracle."""
        self._refuse_if_waiting(client)
        if known():
            return True
        if not self._slots.acquire(timeout=QUEUE_WAIT_SECONDS):
            raise HttpError(503, "the EST server is busy checking credentials; retry shortly", {"Retry-After": 5})
        try:
            self._refuse_if_waiting(client)  # again: failures counted while this one queued
            ok = self._threads.submit(verify).result()
        finally:
            self._slots.release()
        if not ok:
            self._fail(client)
        return ok

    def _refuse_if_waiting(self, client: str) -> None:
        wait = self._penalty(client)
        if wait:
            raise HttpError(429, f"too many failed EST logins from {client}; retry in {wait} s",
                            {"Retry-After": wait})

    def _penalty(self, client: str) -> int:
        """Seconds the client must still wait, or 0."""
        with self._lock:
            started, count = self._failures.get(client, (0.0, 0))
            remaining = started + FAILURE_WINDOW_SECONDS - self._clock()
            if remaining <= 0:
                self._failures.pop(client, None)
                return 0
            return max(1, round(remaining)) if count >= FAILURES_ALLOWED else 0

    def _fail(self, client: str) -> None:
        with self._lock:
            now = self._clock()
            started, count = self._failures.pop(client, (now, 0))
            if started + FAILURE_WINDOW_SECONDS <= now:
                started, count = now, 0
            self._failures[client] = (started, count + 1)
            while len(self._failures) > TRACKED_CLIENTS:
                self._failures.popitem(last=False)
