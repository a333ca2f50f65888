"""Durable file operations: what is written survives a power cut whole or not at all.

Every write goes to a temporary file in the target's directory, is fsynced,
renamed over the target, and the directory is fsynced so the rename itself is
on disk. A crash can leave a temporary file behind; ``remove_stale_temps``
clears them (the agent calls it under its lock before doing anything else).

Links are never written through: a temporary name found in place is unlinked
and created afresh (O_EXCL), and a secret file with a second hard link is
refused rather than read or wiped, since the other name keeps a copy.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from . import crashpoints

TEMP_SUFFIX = ".certrotate-tmp"


class LinkedFileError(Exception):
    """A secret file with more than one hard link: another name shares its content."""

    def __init__(self, path: Path, links: int):
        super().__init__(f"{path} has {links} hard links: another name keeps a copy of its "
                         "content, which certrotate will neither read as a secret nor wipe")
        self.hint = (f"find the other names (find / -xdev -samefile {path}), remove them "
                     "and run certrotate again")


def refuse_linked(path: Path, info: os.stat_result | None = None) -> os.stat_result:
    """The status of the secret file ``path`` (``info`` when given: the caller's fstat);
    LinkedFileError when another hard link shares it."""
    info = info or os.stat(path)
    if info.st_nlink > 1:
        raise LinkedFileError(path, info.st_nlink)
    return info


def fingerprint(path: Path) -> dict:
    """What tells a later run that ``path`` changed: its path, size and mtime."""
    st = os.stat(path)
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


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
    An OSError names ``path``; ``path`` is then as it was and no temporary is left.
    """
    path = Path(path)
    temp = path.with_name(path.name + TEMP_SUFFIX)
    mtime_ns = None
    if keep_mtime:
        try:
            mtime_ns = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            pass
    try:
        _remove_name(temp)  # whatever holds the name (a link, say) is not written through
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except OSError as err:
        raise _naming(err, path) from err
    try:
        try:
            # O_CREAT's mode is filtered by the umask.
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
    except OSError as err:
        _discard(temp)
        raise _naming(err, path) from err
    fsync_dir(path.parent)
    crashpoints.reach(point)


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` naming ``path`` (write and fsync errors, ENOSPC among them, name no file)."""
    return OSError(err.errno, err.strerror, str(path))


def _discard(temp: Path) -> None:
    """Wipe and remove a temporary a failed write left: it frees the space the
    failure handler's own journal save needs, and may hold part of a key."""
    try:
        secure_delete(temp)
    except (OSError, LinkedFileError):
        pass  # the next run's remove_stale_temps clears it


def _remove_name(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def read_secret(path: Path) -> bytes:
    """The content of the secret file ``path``; LinkedFileError when another hard link shares it."""
    with open(path, "rb") as f:
        refuse_linked(path, os.fstat(f.fileno()))
        return f.read()


def delete_public(path: Path, *, point: str | None = None) -> bool:
    """Unlink the public file ``path`` (a certificate: nothing to wipe, so another hard
    link to it does no harm) and fsync its directory; False when it was already gone."""
    path = Path(path)
    if not os.path.lexists(path):
        return False
    if point:
        crashpoints.reach(point)
    _remove_name(path)
    fsync_dir(path.parent)
    return True


def secure_delete(path: Path, *, point: str | None = None) -> bool:
    """Overwrite ``path`` with zeros, fsync, unlink; False when it was already gone.

    A symlink is not followed (ELOOP); a file with another hard link is refused
    (LinkedFileError) with its content intact. ``point`` names the crash point
    reached once the zeros are on disk.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        size = refuse_linked(path, os.fstat(fd)).st_size
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
    """Remove the temporary files a crash left in ``directory``: wiped when the name
    is the file's only one (it may hold part of a key), just unlinked when it is a
    symlink or a hard link (the content belongs to the other name)."""
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.name.endswith(TEMP_SUFFIX):
            continue
        info = entry.lstat()
        if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
            secure_delete(entry)
        elif stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode):
            os.unlink(entry)
            fsync_dir(entry.parent)
        else:
            continue
        removed.append(entry)
    return removed


def ensure_private_dir(directory: Path) -> None:
    """Create ``directory`` and each missing parent mode 0700, whatever the umask;
    tighten ``directory`` if it is looser."""
    directory = Path(directory)
    missing = []
    for path in (directory, *directory.parents):
        if path.exists():
            break
        missing.append(path)
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:  # another agent, waiting for the lock, made it first
            continue
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
    if directory.stat().st_mode & 0o077:
        os.chmod(directory, 0o700)
