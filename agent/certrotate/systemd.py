"""The agent's view of systemd: which units are active, restart them.

Wraps ``systemctl``; the binary and the way to run it are passed in so tests
can put a recording systemctl on PATH (there is no systemd in the test sandbox;
the QEMU suite runs the real one).
"""

from __future__ import annotations

import subprocess
from typing import Callable, Sequence


# The agent's own unit (meta-certrotate installs it; `certrotate check` is its command).
AGENT_SERVICE = "certrotate.service"

# What `systemctl is-active` prints for a unit that is running (it exits 0 for these).
ACTIVE_STATES = ("active", "reloading")
# Seconds one systemctl call may take (a unit's restart included).
SYSTEMCTL_TIMEOUT = 120


class SystemdError(Exception):
    def __init__(self, message: str, *, hint: str):
        super().__init__(message)
        self.hint = hint


class Systemd:
    def __init__(self, systemctl: str = "systemctl", run: Callable = subprocess.run):
        self.systemctl = systemctl
        self.run = run

    def _call(self, args: Sequence[str]) -> subprocess.CompletedProcess:
        try:
            return self.run(
                [self.systemctl, *args], capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT
            )
        except FileNotFoundError as err:
            raise SystemdError(
                f"{self.systemctl} not found", hint="run certrotate on a systemd system"
            ) from err
        except subprocess.TimeoutExpired as err:
            raise SystemdError(
                f"{self.systemctl} {' '.join(args)} did not finish in {SYSTEMCTL_TIMEOUT} s",
                hint="check the units with systemctl status",
            ) from err

    def active(self, units: Sequence[str]) -> list[str]:
        """Those of ``units`` that are active, asked in one systemctl call (a fork each
        would add tens of milliseconds to every rotation on a small device)."""
        if not units:
            return []
        result = self._call(["is-active", *units])
        states = result.stdout.split()
        if len(states) != len(units):
            raise SystemdError(
                f"systemctl is-active {' '.join(units)} printed {result.stdout.strip()[:200]!r} "
                f"({result.stderr.strip()[:300] or 'nothing on stderr'}); one state per unit was expected",
                hint="check that systemd runs and answers (systemctl is-active UNIT...); units "
                "that need no restart can be left out of [services] restart in certrotate.toml",
            )
        return [unit for unit, state in zip(units, states) if state in ACTIVE_STATES]

    def restart(self, units: Sequence[str]) -> None:
        if not units:
            return
        result = self._call(["restart", *units])
        if result.returncode != 0:
            raise SystemdError(
                f"systemctl restart {' '.join(units)} failed ({result.returncode}): "
                f"{result.stderr.strip()[:300]}",
                hint="check the units with systemctl status and journalctl",
            )

    def start_no_block(self, unit: str) -> None:
        """Queue a start of ``unit`` and return without waiting for it."""
        result = self._call(["start", "--no-block", unit])
        if result.returncode != 0:
            raise SystemdError(
                f"systemctl start --no-block {unit} failed ({result.returncode}): "
                f"{result.stderr.strip()[:300]}",
                hint=f"check that {unit} is installed (systemctl status {unit})",
            )
