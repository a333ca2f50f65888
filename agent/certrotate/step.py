"""What every rotation step shares: the Step interface, its context, its error.

A step is idempotent: run twice (after a crash, or to resume a failed
rotation) it finds what it already did and finishes the rest. The context
carries the edges (filesystem root, clock, sleep, systemd, HTTP sessions), so
tests drive real steps against a temporary device tree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import http, pki
from .config import AgentConfig, Root, SotaConfig
from .deadline import Deadline
from .events import EventQueue
from .journal import Journal, Rotation, State
from .keystore import KeyStore
from .systemd import Systemd


class StepError(Exception):
    """A step could not finish; says why and what the operator can do.

    ``rewind_to`` names the step the rotation resumes from, when the failing
    step undid earlier ones (confirm going back to the old identity).
    """

    def __init__(self, message: str, *, hint: str, rewind_to: str | None = None):
        super().__init__(message)
        self.hint = hint
        self.rewind_to = rewind_to


class Step:
    """One step of the rotation. ``name`` is its event name (fioconfig's, exact);
    ``key`` prefixes its crash points and names it in logs and the journal."""

    name: str = ""
    key: str = ""

    def run(self, ctx: "Context") -> None:
        raise NotImplementedError


@dataclass
class Context:
    root: Root
    sota: SotaConfig
    agent: AgentConfig
    journal: Journal
    state: State
    events: EventQueue
    systemd: Systemd
    keys: KeyStore
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    deadline: Deadline = field(default_factory=lambda: Deadline(None))  # the run's
    step_keys: tuple[str, ...] = ()  # the state machine's steps, in order
    _sessions: dict = field(default_factory=dict)

    @property
    def rotation(self) -> Rotation:
        assert self.state.current is not None
        return self.state.current

    def save(self, *, point: str) -> None:
        self.journal.save(self.state, point=point)

    def rewind(self, key: str, *, point: str) -> None:
        """Journal that the rotation resumes from the step ``key``."""
        self.rotation.step = self.step_keys.index(key)
        self.save(point=point)

    # Identities: (certificate file, key file) as host paths, from the key store.
    def old_identity(self) -> tuple[Path, Path]:
        return self.keys.identity(self.rotation, "old")

    def new_identity(self) -> tuple[Path, Path]:
        return self.keys.identity(self.rotation, "new")

    def staged_identity(self) -> tuple[Path, Path]:
        """The new certificate and key where step 1 left them, before finalize installs them."""
        return self.keys.identity(self.rotation, "staged")

    def old_expired(self) -> bool:
        return pki.validity(self.old_certs()[0])[1].timestamp() <= self.clock()

    def server_identity(self) -> tuple[Path, Path]:
        """Who steps 2 to 4 speak to the gateway as: the old identity or, once its
        certificate has expired (the gateway refuses it; the EST server announced the
        new key when it renewed the expired one), the staged new one."""
        return self.staged_identity() if self.old_expired() else self.old_identity()

    def old_key(self):
        return self.keys.old_key(self.rotation)

    def old_certs(self):
        return self.keys.old_certs(self.rotation)

    def new_key(self):
        return self.keys.new_key(self.rotation)

    def ca_file(self) -> Path:
        return self.root(self.sota.ca_file)

    def gateway(self, identity: tuple[Path, Path], method: str, path: str, *, point: str,
                json=None, attempts: int = 5, timeout: float = 30.0,
                reply_within: float | None = None, run: Deadline | None = None) -> http.Reply:
        """One request to the device gateway over mutual TLS as ``identity``, within
        ``run`` (default: the run's deadline) and ``reply_within`` (default: deadlines.request)."""
        cache_key = tuple(map(str, identity))
        session = self._sessions.get(cache_key)
        if session is None:
            session = self._sessions[cache_key] = http.make_session(str(self.ca_file()), cache_key)
        return http.send(
            session, method, self.sota.gateway_url + path, point=point, json=json,
            attempts=attempts, timeout=timeout, sleep=self.sleep,
            reply_within=reply_within or self.agent.request_deadline, run=run or self.deadline,
        )


def expect(reply: http.Reply, ok: range, what: str) -> http.Reply:
    """``reply`` if its status is in ``ok``; otherwise a StepError naming ``what``."""
    if reply.status in ok:
        return reply
    hint = {
        401: "the gateway did not accept the device certificate; check the device's identity",
        403: "the gateway refused this device certificate; check that the device is registered "
        "and not deny-listed",
        409: "the server refused the change while the device configuration is locked; "
        "check the device on the server (fioctl devices show)",
    }.get(reply.status, "check the gateway's logs")
    raise StepError(f"{what}: the gateway answered {reply.status}: {reply.first_line()!r}", hint=hint)
