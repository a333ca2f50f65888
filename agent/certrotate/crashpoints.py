"""Named points where a rotation persists state or talks to the network.

Tests cut the power at each of them: ``CERTROTATE_CRASH_AT=NAME`` kills the
process with SIGKILL when it reaches NAME; ``CERTROTATE_PAUSE_AT=NAME`` writes
NAME to the file ``CERTROTATE_PAUSE_NOTIFY`` names (if set) and sleeps until
killed, so a test can cut a QEMU guest's power at a moment it chose;
``CERTROTATE_TRACE_POINTS=FILE`` appends every point reached, one per line, so
a suite can enumerate all of them from one clean run. Names are unique within
one rotation (they carry the step and the action).
"""

import os
import signal
import time

_crash_at = os.environ.get("CERTROTATE_CRASH_AT")
_pause_at = os.environ.get("CERTROTATE_PAUSE_AT")
_trace = os.environ.get("CERTROTATE_TRACE_POINTS")


def reach(name: str) -> None:
    """Mark that the agent is at point ``name``; a no-op unless a test asked."""
    if _trace:
        with open(_trace, "a", encoding="utf-8") as trace:
            trace.write(name + "\n")
    if name == _crash_at:
        os.kill(os.getpid(), signal.SIGKILL)
    if name == _pause_at:
        _pause(name)


def _pause(name: str) -> None:
    notify = os.environ.get("CERTROTATE_PAUSE_NOTIFY")
    if notify:
        fd = os.open(notify, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, name.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    while True:
        time.sleep(3600)
