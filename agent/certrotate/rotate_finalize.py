"""Step 5: put the new key and certificate in place and point sota.toml at them.

Writes /var/sota/pkey-<id>.pem (0600) and client-<id>.pem, edits the two
import.tls_* lines of sota.toml, and installs the config re-encrypted in
step 3. The old files stay until the gateway has confirmed the new ones.
"""

from __future__ import annotations

from . import config, fsutil
from .rotate_local_config import CONFIG_FILE
from .step import Context, Step


class FinalizeStep(Step):
    name = "Finalize aktualizr configuration"
    key = "finalize"

    def run(self, ctx: Context) -> None:
        rotation = ctx.rotation
        copies = [
            (ctx.journal.new_key_path(rotation.rotation_id), rotation.new_key_file, 0o600, "key"),
            (ctx.journal.new_cert_path(rotation.rotation_id), rotation.new_cert_file, 0o644, "cert"),
        ]
        for source, device_path, mode, what in copies:
            data = fsutil.read_secret(source)  # the agent's own files: a second link is foreign
            target = ctx.root(device_path)
            if not target.exists() or target.read_bytes() != data:
                fsutil.atomic_write(target, data, mode, point=f"finalize:{what}")
        config.point_tls_at(
            ctx.root, ctx.sota, rotation.new_key_file, rotation.new_cert_file, point="finalize:sota"
        )
        staged = ctx.journal.staged_config_path(rotation.rotation_id)
        if staged.exists():
            target = ctx.root(f"{ctx.agent.config_dir.rstrip('/')}/{CONFIG_FILE}")
            data = staged.read_bytes()
            if not target.exists() or target.read_bytes() != data:
                # fioconfig's next If-Modified-Since is this file's mtime (the Date of
                # its last download): a new one would hide server changes made since.
                fsutil.atomic_write(target, data, 0o600, point="finalize:config", keep_mtime=True)
