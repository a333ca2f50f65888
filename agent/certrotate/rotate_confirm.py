"""Step 7: prove with a real mutual-TLS request that the gateway accepts the new identity.

GET /device as the new certificate. If the gateway refuses it while it still
accepts the old one, the device goes back to the old identity (sota.toml,
config.encrypted, a restart of the units) and the rotation is left to resume
from the lock step, which announces the new key again; the step fails saying so. If neither identity gets through,
nothing is undone: the network or the gateway is at fault, retry later.
"""

from __future__ import annotations

import logging

from . import fsutil, localconfig
from .http import RunDeadlinePassed, TransportError
from .rotate_local_config import CONFIG_FILE
from .step import Context, Step, StepError

log = logging.getLogger("certrotate")

REFUSED = (401, 403)


class ConfirmStep(Step):
    name = "Confirm new certificate with gateway"
    key = "confirm"

    def run(self, ctx: Context) -> None:
        why = _refusal(ctx, ctx.new_identity(), "confirm:new")
        if why is None:
            return
        old_refused = _refusal(ctx, ctx.old_identity(), "confirm:old")
        if old_refused is not None:
            raise StepError(
                f"the gateway accepts neither the new certificate ({why}) nor the old one ({old_refused})",
                hint="check the network path to the gateway and its logs; the rotation resumes "
                "on the next run",
            )
        # Journaled before the first change back: a run cut short in the revert resumes
        # from the lock step (finalize installs the new identity again) instead of
        # confirming and retiring an identity sota.toml may no longer name.
        ctx.rewind("lock", point="confirm:rewind")
        self.revert(ctx)
        raise StepError(
            f"the gateway refused the new certificate ({why}); the device is back on its old "
            "key and certificate",
            hint="check the issued certificate and the device on the server (fioctl devices show); "
            "the next run announces the new key again and resumes from there",
            rewind_to="lock",
        )

    def revert(self, ctx: Context) -> None:
        rotation = ctx.rotation
        ctx.keys.point_at(rotation, "old")
        device_path = f"{ctx.agent.config_dir.rstrip('/')}/{CONFIG_FILE}"
        target = ctx.root(device_path)
        if target.exists():
            old_key = ctx.old_key()
            current = localconfig.parse(target.read_bytes(), device_path)
            if not localconfig.encrypted_for(current, old_key):
                restored = localconfig.reencrypt(current, [ctx.new_key(), old_key], old_key.public_key(), device_path)
                fsutil.atomic_write(target, localconfig.dump(restored), 0o600, point="confirm:revert-config",
                                   keep_mtime=True)
        rotation.restarted = False
        try:
            ctx.systemd.restart(ctx.systemd.active(ctx.agent.restart))
        except Exception as err:  # the revert stands; the operator learns the units need a restart
            log.error("confirm: restarting %s on the old identity failed: %s",
                      ", ".join(ctx.agent.restart), err)


def _refusal(ctx: Context, identity, point: str) -> str | None:
    """None when GET /device as ``identity`` succeeds; otherwise why it did not."""
    try:
        reply = ctx.gateway(identity, "GET", "/device", point=point, attempts=3)
    except RunDeadlinePassed:
        raise  # nothing was learnt about either identity: resume confirm on the next run
    except TransportError as err:
        return str(err)
    if reply.status == 200:
        return None
    return f"HTTP {reply.status}: {reply.first_line()}"
