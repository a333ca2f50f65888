"""`spawn`: start a long-lived process (a server, a QEMU guest) that dies with
the test run, however the run ends (issue item 16).

The kernel SIGKILLs the child when its parent dies (PR_SET_PDEATHSIG), so a
pytest killed outright, or ended by pytest-timeout's os._exit, leaves nothing
running. The signal fires when the spawning *thread* exits: spawn from the
main thread (where pytest runs tests), not from a thread that ends sooner.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess

PR_SET_PDEATHSIG = 1
# Looked up before any fork: the forked child only makes the call.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def spawn(argv: list[str], **popen_kwargs) -> subprocess.Popen:
    """subprocess.Popen(argv, **popen_kwargs) for a child SIGKILLed when this process dies."""
    parent = os.getpid()

    def die_with_parent() -> None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return subprocess.Popen(argv, preexec_fn=die_with_parent, **popen_kwargs)
