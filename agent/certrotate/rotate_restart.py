"""Step 6: restart the configured units that are active, so they load the new identity.

At most once per rotation: the journal records the restart before systemctl
runs, so a restart that takes the agent down with it (were it in a restarted
unit's cgroup) is not repeated in a loop; the next run goes on with confirm.
Missing the restart can only happen if the agent dies in between, which on a
device means a power cut, after which every unit starts with the new files.
"""

from __future__ import annotations

import logging

from .step import Context, Step, StepError
from .systemd import SystemdError

log = logging.getLogger("certrotate")


class RestartStep(Step):
    name = "Restart services"
    key = "restart"

    def run(self, ctx: Context) -> None:
        rotation = ctx.rotation
        if rotation.restarted:
            log.info("restart: already done for this rotation")
            return
        units = ctx.systemd.active(ctx.agent.restart)
        rotation.restarted = True
        ctx.save(point="restart:journal")
        try:
            ctx.systemd.restart(units)
        except SystemdError as err:
            rotation.restarted = False
            ctx.save(point="restart:failed")
            raise StepError(str(err), hint=err.hint) from err
        log.info("restart: %s", ", ".join(units) if units else "no configured unit is active")
