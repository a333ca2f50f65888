"""Step 5: put the new key and certificate in place and point sota.toml at them.

The key store installs them (files: /var/sota/pkey-<id>.pem (0600) and
client-<id>.pem; a token: the certificate imported at the new id) and edits
sota.toml's two lines (import.tls_* or p11.tls_*_id); then the config
re-encrypted in step 3 is installed. The old identity stays until the
gateway has confirmed the new one.
"""

from __future__ import annotations

from . import fsutil
from .rotate_local_config import CONFIG_FILE
from .step import Context, Step


class FinalizeStep(Step):
    name = "Finalize aktualizr configuration"
    key = "finalize"

    def run(self, ctx: Context) -> None:
        rotation = ctx.rotation
        ctx.keys.install(rotation)
        ctx.keys.point_at(rotation, "new")
        staged = ctx.journal.staged_config_path(rotation.rotation_id)
        if staged.exists():
            target = ctx.root(f"{ctx.agent.config_dir.rstrip('/')}/{CONFIG_FILE}")
            data = staged.read_bytes()
            if not target.exists() or target.read_bytes() != data:
                # fioconfig's next If-Modified-Since is this file's mtime (the Date of
                # its last download): a new one would hide server changes made since.
                fsutil.atomic_write(target, data, 0o600, point="finalize:config", keep_mtime=True)
