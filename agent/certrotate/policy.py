"""When is the certificate due for renewal? Light: ``check`` runs this on its fast path.

The validity of the current certificate is cached in the state dir, keyed by
the certificate file's path, size and mtime, so a ``check`` with nothing due
reads two small files and imports neither cryptography nor requests.
"""

from __future__ import annotations

import json
import time
from typing import NamedTuple
from pathlib import Path

from . import fsutil

CACHE_FILE = "validity-cache.json"
DAY = 86400.0
# No correct clock reads earlier than this agent's release (2026-12-01; moved on
# with each release): a device without an RTC boots in 1970, or at its image's
# build date, until NTP answers.
RELEASED_AT = 1796083200.0


class WrongClock(Exception):
    """The clock cannot be right: nothing is started or judged on it (exit code 5)."""

    exit_code = 5
    hint = ("wait until the clock is set (NTP: `timedatectl timesync-status`); the timer's next run "
            "goes on by itself, and nothing was changed")


class Validity(NamedTuple):
    not_before: float  # seconds since the epoch
    not_after: float


def due(validity: Validity, now: float, lifetime_fraction: float, max_age_days: float) -> str | None:
    """Why the certificate is due for renewal at ``now``, or None when it is not."""
    lifetime = validity.not_after - validity.not_before
    elapsed = now - validity.not_before
    if now >= validity.not_after:
        return "the certificate has expired"
    if elapsed >= lifetime_fraction * lifetime:
        return f"{elapsed / lifetime:.0%} of its validity has elapsed (policy: {lifetime_fraction:.1%})"
    if elapsed >= max_age_days * DAY:
        return f"it is {elapsed / DAY:.0f} days old (policy: at most {max_age_days:g})"
    return None


def wrong_clock(validity: Validity, now: float) -> WrongClock | None:
    """Why ``now`` cannot be right (before this agent's release or the certificate's notBefore), or None."""
    for earliest, what in ((RELEASED_AT, "this agent's release"),
                           (validity.not_before, "the current certificate's notBefore")):
        if now < earliest:
            return WrongClock(f"the clock reads {_utc(now)}, before {what} ({_utc(earliest)}): "
                              "it cannot be right, so no certificate is judged due and no rotation runs")
    return None


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def cached_validity(state_dir: Path, cert_file: Path) -> Validity | None:
    """The cached validity of ``cert_file``, or None when the cache does not match it."""
    try:
        cache = json.loads((Path(state_dir) / CACHE_FILE).read_bytes())
        if cache.get("file") != fsutil.fingerprint(cert_file):
            return None
        return Validity(float(cache["not_before"]), float(cache["not_after"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def parse_validity(cert_file: Path) -> Validity:
    """Parse ``cert_file`` (imports cryptography)."""
    from . import certs, pki

    not_before, not_after = pki.validity(certs.load_certs(cert_file)[0])
    return Validity(not_before.timestamp(), not_after.timestamp())


def read_validity(state_dir: Path, cert_file: Path) -> Validity:
    """Parse ``cert_file`` and refresh the cache."""
    validity = parse_validity(cert_file)
    fsutil.ensure_private_dir(Path(state_dir))
    record = {"file": fsutil.fingerprint(cert_file), "not_before": validity.not_before,
              "not_after": validity.not_after}
    fsutil.atomic_write(Path(state_dir) / CACHE_FILE, json.dumps(record).encode(), 0o600,
                        point="check:validity-cache")
    return validity
