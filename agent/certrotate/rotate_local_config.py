"""Step 3: re-encrypt the device's local fioconfig config for the new key.

The result is staged in the state dir; finalize puts it in place. Nothing to
do when the device has no config.encrypted.
"""

from __future__ import annotations

from . import fsutil, localconfig
from .step import Context, Step

CONFIG_FILE = "config.encrypted"


class LocalConfigStep(Step):
    name = "Update local configuration with new key"
    key = "local_config"

    def run(self, ctx: Context) -> None:
        device_path = f"{ctx.agent.config_dir.rstrip('/')}/{CONFIG_FILE}"
        try:
            data = ctx.root(device_path).read_bytes()
        except FileNotFoundError:
            return
        new_key = ctx.new_key()
        config = localconfig.parse(data, device_path)
        staged = localconfig.reencrypt(config, [ctx.old_key(), new_key], new_key.public_key(), device_path)
        fsutil.atomic_write(
            ctx.journal.staged_config_path(ctx.rotation.rotation_id),
            localconfig.dump(staged), 0o600, point="local_config:staged",
        )
