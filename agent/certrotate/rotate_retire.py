"""Step 8: the gateway has confirmed the new identity; the old key and certificate go.

Only once sota.toml names the new identity, the key store removes the old one
(files: the key wiped and unlinked, see
keystore.FileKeyStore.retire; a token: its old objects destroyed); then the
rotation's own copies in the state dir are wiped and unlinked.
"""

from __future__ import annotations

from . import fsutil
from .step import Context, Step, StepError


class RetireStep(Step):
    name = "Remove old key and certificate"
    key = "retire"

    def run(self, ctx: Context) -> None:
        rotation = ctx.rotation
        _, new, live = ctx.keys.names(rotation)
        if live != new:
            raise StepError(f"sota.toml names {'/'.join(live)}, not the new identity {'/'.join(new)}: "
                            "the old identity is not removed",
                            hint="check sota.toml; run certrotate rotate again")
        ctx.keys.retire(rotation)
        rotation_id = rotation.rotation_id
        for path, what in (
            (ctx.journal.new_key_path(rotation_id), "staged-key"),
            (ctx.journal.new_cert_path(rotation_id), "staged-cert"),
            (ctx.journal.staged_config_path(rotation_id), "staged-config"),
        ):
            fsutil.secure_delete(path, point=f"retire:{what}")
