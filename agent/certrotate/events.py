"""Rotation events in fioconfig's schema, queued on disk and delivered in order.

Each event is its own file under ``<state_dir>/events/`` (written durably),
named by a sequence number so the queue keeps append order across runs.
``deliver`` makes one short attempt to POST everything queued to the gateway's
/events; on success the files go, on failure they stay for a later run. It
never raises: event delivery must not block or fail a rotation.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import tomllib
import uuid
from pathlib import Path
from typing import Callable

from . import crashpoints, fsutil

log = logging.getLogger("certrotate")

QUEUE_DIR = "events"
STARTED = "CertRotationStarted"
COMPLETED = "CertRotationCompleted"
BATCH = 100  # events per POST /events: ~30 KiB, far below a gateway's body limit


def current_target(path: Path) -> tuple[str, str]:
    """(target name, version) from aktualizr-lite's current-target file; blanks if unknown."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return "", ""
    return str(data.get("TARGET_NAME", "")), str(data.get("CUSTOM_VERSION", ""))


class EventQueue:
    def __init__(self, state_dir: Path, *, clock: Callable[[], float], target: tuple[str, str] = ("", "")):
        self.dir = Path(state_dir) / QUEUE_DIR
        self.clock = clock
        self.target_name, self.target_version = target

    def pending(self) -> list[Path]:
        try:
            return sorted(p for p in self.dir.iterdir() if p.name.endswith(".json"))
        except FileNotFoundError:
            return []

    def queue(self, name: str, rotation_id: str, *, success: bool, details: str = "", point: str) -> dict:
        """Append one event (``name`` is the eventType id) to the queue, durably."""
        fsutil.ensure_private_dir(self.dir)
        existing = self.pending()
        number = int(existing[-1].name.split(".")[0]) + 1 if existing else 1
        device_time = datetime.datetime.fromtimestamp(self.clock(), datetime.timezone.utc)
        event = {
            "id": str(uuid.uuid4()),
            "deviceTime": device_time.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "eventType": {"id": name, "version": 0},
            "event": {
                "correlationId": rotation_id,
                "success": success,
                "targetName": self.target_name,
                "version": self.target_version,
            },
        }
        if details:
            event["event"]["details"] = details
        data = json.dumps(event, sort_keys=True).encode()
        fsutil.atomic_write(self.dir / f"{number:08d}.json", data, 0o600, point=point)
        return event

    def deliver(self, post: Callable[[list[dict]], None]) -> bool:
        """Send the queued events with ``post``, oldest first, at most BATCH per call (a
        long queue must not outgrow the gateway's body limit); one attempt each, stopping
        at the first failure. True when the queue is empty."""
        files = self.pending()
        delivered = 0
        while files:
            batch, files = files[:BATCH], files[BATCH:]
            events = []
            for path in batch:
                try:
                    events.append(json.loads(path.read_bytes()))
                except ValueError:
                    log.warning("dropping unreadable queued event %s", path.name)
                    path.unlink()
            try:
                post(events)
            except Exception as err:  # delivery must never fail the rotation
                log.warning("events: %d kept for a later run: %s", len(events) + len(files), err)
                return False
            crashpoints.reach("events:delivered")
            for path in batch:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            fsutil.fsync_dir(self.dir)
            delivered += len(events)
        if delivered:
            log.info("events: delivered %d", delivered)
        return True
