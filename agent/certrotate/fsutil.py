"""Durable file operations: what is written survives a power cut whole or not at all.

Every write goes to a temporary file in the target's directory, is fsynced,
renamed over the target, and the directory is fsynced so the rename itself is
on disk. A crash can leave a temporary file behind; ``remove_stale_temps``
clears them (the agent calls it under its lock before doing anything else).
"""

from __future__ import annotations

import os
from pathlib import Path

from . import crashpoints

TEMP_SUFFIX = ".certrotate-tmp"


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int, *, point: str, keep_mtime: bool = False) -> None:
    """Replace ``path`` with ``data`` (file mode ``mode``), durably.

    ``point`` names the crash point reached once the new content is in place
    (so a crash there leaves exactly the state this write made). ``keep_mtime``
    gives the new file the old one's modification time, in the same rename.
    """
    path = Path(path)
    temp = path.with_name(path.name + TEMP_SUFFIX)
    mtime_ns = None
    if keep_mtime:
        try:
            mtime_ns = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            pass
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        # O_CREAT's mode is filtered by the umask and ignored for an existing file.
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if mtime_ns is not None:
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    fsync_dir(path.parent)
    crashpoints.reach(point)


def secure_delete(path: Path, *, point: str | None = None) -> bool:
    """Overwrite ``path`` with zeros, fsync, unlink; False when it was already gone.

    ``point`` names the crash point reached once the zeros are on disk.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        zeros = bytes(min(size, 1 << 16))
        written = 0
        while written < size:
            written += os.write(fd, zeros[: size - written])
        os.fsync(fd)
    finally:
        os.close(fd)
    if point:
        crashpoints.reach(point)
    os.unlink(path)
    fsync_dir(path.parent)
    return True


def remove_stale_temps(directory: Path) -> list[Path]:
    """Securely delete temporary files a crash left in ``directory``."""
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        if entry.name.endswith(TEMP_SUFFIX) and entry.is_file():
            secure_delete(entry)
            removed.append(entry)
    return removed


def ensure_private_dir(directory: Path) -> None:
    """Create ``directory`` (mode 0700) if missing; tighten it if it is looser."""
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if directory.stat().st_mode & 0o077:
        os.chmod(directory, 0o700)
