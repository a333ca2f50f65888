"""Step 8: the gateway has confirmed the new identity; the old key and certificate go.

The old key file is overwritten with zeros, fsynced and unlinked; so are the
rotation's own copies in the state dir (the new key now lives in /var/sota).
The old certificate is public: it is unlinked, even when another hard link
shares it (refusing it would stop the rotation here on every run).
An old key or certificate that is a symlink is unlinked itself; the file it
points to is wiped with it only when that is the device's own file in
aktualizr-lite's storage (storage.path, /var/sota): a file elsewhere is
someone else's and stays untouched.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import fsutil
from .step import Context, Step


class RetireStep(Step):
    name = "Remove old key and certificate"
    key = "retire"

    def run(self, ctx: Context) -> None:
        rotation = ctx.rotation
        keep = {rotation.new_key_file, rotation.new_cert_file}
        storage = Path(os.path.realpath(ctx.root(ctx.sota.storage_path)))
        kept_files = {Path(os.path.realpath(ctx.root(device_path))) for device_path in keep}
        for device_path, what, delete in ((rotation.old_key_file, "old-key", fsutil.secure_delete),
                                          (rotation.old_cert_file, "old-cert", fsutil.delete_public)):
            if device_path not in keep:
                _retire_old(ctx.root(device_path), storage, kept_files, delete, point=f"retire:{what}")
        rotation_id = rotation.rotation_id
        for path, what in (
            (ctx.journal.new_key_path(rotation_id), "staged-key"),
            (ctx.journal.new_cert_path(rotation_id), "staged-cert"),
            (ctx.journal.staged_config_path(rotation_id), "staged-config"),
        ):
            fsutil.secure_delete(path, point=f"retire:{what}")


def _retire_old(path: Path, storage: Path, kept_files: set[Path], delete, *, point: str) -> None:
    if not path.is_symlink():
        delete(path, point=point)
        return
    target = Path(os.path.realpath(path))
    # The target goes first: a crash in between leaves a dangling link, which a
    # resumed run unlinks; the other order would leave the old key behind for good.
    if target.is_relative_to(storage) and target not in kept_files and target.is_file():
        delete(target, point=point)
    os.unlink(path)
    fsutil.fsync_dir(path.parent)
