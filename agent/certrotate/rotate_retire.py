"""Step 8: the gateway has confirmed the new identity; the old key and certificate go.

The old key file is overwritten with zeros, fsynced and unlinked; so are the
rotation's own copies in the state dir (the new key now lives in /var/sota).
"""

from __future__ import annotations

from . import fsutil
from .step import Context, Step


class RetireStep(Step):
    name = "Remove old key and certificate"
    key = "retire"

    def run(self, ctx: Context) -> None:
        rotation = ctx.rotation
        keep = {rotation.new_key_file, rotation.new_cert_file}
        for device_path, what in ((rotation.old_key_file, "old-key"), (rotation.old_cert_file, "old-cert")):
            if device_path not in keep:
                fsutil.secure_delete(ctx.root(device_path), point=f"retire:{what}")
        rotation_id = rotation.rotation_id
        for path, what in (
            (ctx.journal.new_key_path(rotation_id), "staged-key"),
            (ctx.journal.new_cert_path(rotation_id), "staged-cert"),
            (ctx.journal.staged_config_path(rotation_id), "staged-config"),
        ):
            fsutil.secure_delete(path, point=f"retire:{what}")
