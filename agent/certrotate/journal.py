"""The rotation journal: one JSON state file, written durably, one agent at a time.

state.json (mode 0600) holds:
  {"schema": 1,
   "current": null | {rotation fields, see Rotation},
   "completed": [{"rotation_id", "success", "finished"} ...]  (newest last, bounded)}

No key material ever goes in here: the new private key is its own 0600 file
(``<state_dir>/<rotation-id>.key``), named by the rotation id.

Older schemas are upgraded on load (``_UPGRADES``), so an agent updated by OTA
in the middle of a rotation resumes the rotation an earlier version began.
The other way round (an OTA rollback brings back an older agent), a journal
is written in the oldest schema that holds it: a file rotation stays schema 1
(what agents before token support read, and resume), and only a rotation of
a token-held identity is schema 2. An agent refuses a schema newer than its
own, with a hint, and never rewrites it: the identity sota.toml names stays
live, and the newer agent, once back, goes on. tests/agent/fixtures holds one
journal per schema (state-v1, v2, and v3 as a future agent's).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from . import fsutil

SCHEMA = 2
# Schema 2 adds the token fields of Rotation; a file rotation leaves them out (schema 1).
TOKEN_FIELDS = ("key_store", "old_key_id", "old_cert_id", "new_key_id", "new_cert_id", "old_public_key",
                "new_public_key")
STATE_FILE = "state.json"
LOCK_FILE = "lock"
KEEP_COMPLETED = 20


class JournalError(Exception):
    def __init__(self, message: str, *, hint: str):
        super().__init__(message)
        self.hint = hint


class LockHeld(Exception):
    """Another agent holds the lock (exit code 3)."""

    exit_code = 3
    hint = "try again when it has finished"


@dataclass
class Rotation:
    """One rotation in progress. Device paths are absolute device paths."""

    rotation_id: str
    est_server: str
    reason: str = ""
    step: int = 0  # index of the next step to run
    old_key_file: str = ""
    old_cert_file: str = ""
    new_key_file: str = ""  # where finalize puts the new key and cert (device paths)
    new_cert_file: str = ""
    restarted: bool = False
    last_error: dict | None = None  # {"step", "message", "hint"}
    superseded: list[str] = field(default_factory=list)  # ids requested while this ran
    # A token-held identity (keystore.PKCS11): the CKA_IDs as sota.toml writes them, the
    # live public key when the rotation began and the one generated at new_key_id (PEM),
    # so that a resumed run knows each for what it is.
    key_store: str = "file"
    old_key_id: str = ""
    old_cert_id: str = ""
    new_key_id: str = ""
    new_cert_id: str = ""
    old_public_key: str = ""
    new_public_key: str = ""

    @classmethod
    def from_json(cls, data: dict) -> "Rotation":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class State:
    current: Rotation | None = None
    completed: list[dict] = field(default_factory=list)

    def completed_ids(self) -> set[str]:
        return {entry["rotation_id"] for entry in self.completed if entry.get("success")}

    def last_completed(self) -> dict | None:
        return self.completed[-1] if self.completed else None


# schema N -> N+1 functions, applied in turn. 1 -> 2: a schema-1 rotation is a file rotation,
# which the new fields' defaults already say.
_UPGRADES: dict[int, object] = {1: lambda data: data}


class Journal:
    """The state file in ``state_dir`` and the lock that serialises agents."""

    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir)
        self.path = self.dir / STATE_FILE
        self._lock_fd: int | None = None

    def lock(self, wait: float = 0.0, clock=time.monotonic, sleep=time.sleep) -> None:
        """Take the agent lock, trying for up to ``wait`` seconds, or raise LockHeld;
        held until unlock() or the process exits."""
        fsutil.ensure_private_dir(self.dir)
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = clock() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                if clock() >= deadline:
                    os.close(fd)
                    raise LockHeld(f"another certrotate holds {self.dir / LOCK_FILE}") from err
                sleep(0.2)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def load(self) -> State:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return State()
        try:
            data = json.loads(raw)
            schema = data["schema"]
        except (ValueError, KeyError, TypeError) as err:
            raise JournalError(
                f"{self.path} is corrupt ({err})",
                hint="inspect it; if no rotation is under way, move it aside and run again",
            ) from err
        if not isinstance(schema, int) or schema > SCHEMA:
            raise JournalError(
                f"{self.path} has schema {schema!r}; this agent knows up to {SCHEMA}",
                hint="a newer agent wrote it: install that version or newer",
            )
        if schema < SCHEMA and schema not in _UPGRADES:
            raise JournalError(
                f"{self.path} has schema {schema}, which no certrotate version wrote",
                hint="inspect it; if no rotation is under way, move it aside and run again",
            )
        while schema < SCHEMA:
            data = _UPGRADES[schema](data)
            schema += 1
        current = data.get("current")
        return State(
            current=Rotation.from_json(current) if current else None,
            completed=list(data.get("completed", [])),
        )

    def save(self, state: State, *, point: str) -> None:
        current = asdict(state.current) if state.current else None
        schema = SCHEMA
        if current is None or current["key_store"] == "file":
            schema = 1
            for name in TOKEN_FIELDS:
                (current or {}).pop(name, None)
        data = {"schema": schema, "current": current, "completed": state.completed[-KEEP_COMPLETED:]}
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        fsutil.atomic_write(self.path, text.encode(), 0o600, point=point)

    def new_key_path(self, rotation_id: str) -> Path:
        return self.dir / f"{rotation_id}.key"

    def new_cert_path(self, rotation_id: str) -> Path:
        return self.dir / f"{rotation_id}.crt"

    def staged_config_path(self, rotation_id: str) -> Path:
        return self.dir / f"{rotation_id}.config.encrypted"
