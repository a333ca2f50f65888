"""The rotation state machine: run the steps in order, journaling after each.

The journal's ``step`` is the index of the next step to run. After a step
succeeds its event is queued and then the journal advances (a crash in
between repeats an idempotent step and at worst queues its event twice; never
loses it). A failing step records its error in the journal, queues its event
and CertRotationCompleted with success=false, and leaves the rotation to
resume. Completion queues CertRotationCompleted (success) before the journal
closes the rotation.
"""

from __future__ import annotations

import errno
import logging
import re

from . import events as events_mod
from .config import RUN_DEADLINE_MAX, ConfigError
from .deadline import Deadline
from .est import EstPending
from .journal import Rotation
from .rotate_confirm import ConfirmStep
from .rotate_est import EstStep
from .rotate_finalize import FinalizeStep
from .rotate_local_config import LocalConfigStep
from .rotate_lock import LockStep
from .rotate_restart import RestartStep
from .rotate_retire import RetireStep
from .rotate_server_config import ServerConfigStep
from .step import Context, Step, StepError
from .systemd import SYSTEMCTL_TIMEOUT

log = logging.getLogger("certrotate")

# Used with fullmatch: `$` would also match before a trailing newline.
ROTATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# Seconds for delivering the queued events at the end of a run, past its deadline if need be
# (a failed run's events say why it failed), and for each batch's reply.
EVENTS_DEADLINE = 30.0
EVENTS_REPLY_DEADLINE = 10.0
# The longest one run holds the lock: its deadline, two systemctl calls (the restart
# step) begun just before it, then the events. certrotate.service's TimeoutStartSec is above.
LONGEST_RUN = RUN_DEADLINE_MAX + 2 * SYSTEMCTL_TIMEOUT + EVENTS_DEADLINE


class StartedStep(Step):
    """Step 0: announces the rotation (its event is CertRotationStarted)."""

    name = events_mod.STARTED
    key = "started"

    def run(self, ctx: Context) -> None:
        pass


STEPS: list[Step] = [
    StartedStep(), EstStep(), LockStep(), LocalConfigStep(), ServerConfigStep(),
    FinalizeStep(), RestartStep(), ConfirmStep(), RetireStep(),
]
CONFIRM_INDEX = next(i for i, step in enumerate(STEPS) if isinstance(step, ConfirmStep))
EST_INDEX = next(i for i, step in enumerate(STEPS) if isinstance(step, EstStep))
FINALIZE_INDEX = next(i for i, step in enumerate(STEPS) if isinstance(step, FinalizeStep))


class RotationFailed(Exception):
    """A step failed; the rotation stays resumable (exit code 1)."""

    exit_code = 1

    def __init__(self, step: Step, message: str, hint: str):
        super().__init__(f"step '{step.name}' failed: {message}")
        self.step = step
        self.hint = hint


class RotationWaiting(Exception):
    """The EST server asked us to come back later (exit code 4)."""

    exit_code = 4

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.hint = hint


def check_rotation_id(rotation_id: str) -> str:
    if not ROTATION_ID.fullmatch(rotation_id):
        raise ConfigError(
            f"rotation id {rotation_id!r} is not allowed",
            hint="use letters, digits, '.', '_' or '-', at most 100 (e.g. certs-1700000000)",
        )
    return rotation_id


def begin(ctx: Context, rotation_id: str, est_server: str, reason: str = "",
          request: dict | None = None) -> Rotation:
    """Record a new rotation in the journal; the first durable act of a rotation.

    ``request`` holds what the request said of where the new identity goes (the
    handler's PKEYIDS and CERTIDS, as ``key_ids`` and ``cert_ids``)."""
    rotation = Rotation(rotation_id=check_rotation_id(rotation_id), est_server=est_server, reason=reason)
    ctx.keys.plan(rotation, request or {})
    ctx.state.current = rotation
    ctx.save(point="journal:start")
    log.info("rotation %s: started (EST server %s)", rotation_id, est_server)
    return ctx.state.current


def supersede(ctx: Context, rotation_id: str) -> None:
    """Note a rotation request that arrived while another is in progress.

    The one in progress completes first; the new id is then recorded as done
    with it (its certificate is brand new), so it is a no-op when it comes again.
    """
    current = ctx.rotation
    if rotation_id == current.rotation_id or rotation_id in current.superseded:
        return
    current.superseded.append(rotation_id)
    ctx.save(point="journal:superseded")
    log.info("rotation %s requested while %s is in progress: finishing %s first; "
             "%s will be satisfied by it", rotation_id, current.rotation_id, current.rotation_id, rotation_id)


def redirect_est(ctx: Context, est_server: str) -> None:
    """Use ``est_server`` for a rotation that has no certificate yet.

    A rotation started against a wrong or dead EST server must not be stuck
    with it: until the EST step has succeeded, an operator's new URL wins.
    """
    current = ctx.rotation
    if est_server == current.est_server or current.step > EST_INDEX:
        return
    log.info("rotation %s: EST server changed from %s to %s", current.rotation_id,
             current.est_server, est_server)
    current.est_server = est_server
    ctx.save(point="journal:est-server")


def run(ctx: Context) -> None:
    """Run the rotation in progress from its next step to completion."""
    rotation = ctx.rotation
    while rotation.step < len(STEPS):
        step = STEPS[rotation.step]
        log.info("rotation %s: step %d/%d: %s", rotation.rotation_id, rotation.step,
                 len(STEPS) - 1, step.name)
        try:
            step.run(ctx)
        except EstPending as err:
            _record_error(ctx, step, error_text(err), err.hint)
            ctx.save(point=f"journal:{step.key}-waiting")
            raise RotationWaiting(f"step '{step.name}': {error_text(err)}", err.hint) from err
        except Exception as err:
            hint = getattr(err, "hint", None)
            if hint is None and not isinstance(err, OSError):
                raise  # a bug, not a condition the operator can act on: show the traceback
            hint = hint or _os_error_hint(err)
            _fail(ctx, step, err, hint)
        rotation.step += 1
        rotation.last_error = None
        ctx.events.queue(step.name, rotation.rotation_id, success=True, point=f"event:{step.key}")
        ctx.save(point=f"journal:{step.key}")
    _complete(ctx)


def error_text(err: Exception) -> str:
    """The message of ``err`` without its hint (several error types append it in str())."""
    if err.args and isinstance(err.args[0], str):
        return err.args[0]
    return str(err)


def _os_error_hint(err: OSError) -> str:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f"the filesystem holding {err.filename}" if err.filename else "the device's filesystems"
        return (f"free space on {where} (df shows how full it is) and run certrotate rotate "
                "again; the rotation resumes at this step")
    return "check the file named above (permissions, free space) and run certrotate rotate again"


def _record_error(ctx: Context, step: Step, message: str, hint: str) -> None:
    ctx.rotation.last_error = {"step": step.name, "message": message, "hint": hint}


def _fail(ctx: Context, step: Step, err: Exception, hint: str) -> None:
    rotation = ctx.rotation
    message = error_text(err)
    _record_error(ctx, step, message, hint)
    rewind_to = getattr(err, "rewind_to", None)
    if isinstance(err, StepError) and rewind_to:
        rotation.step = next(i for i, s in enumerate(STEPS) if s.key == rewind_to)
    try:
        ctx.save(point=f"journal:{step.key}-failed")
        ctx.events.queue(step.name, rotation.rotation_id, success=False, details=message,
                         point=f"event:{step.key}-failed")
        ctx.events.queue(events_mod.COMPLETED, rotation.rotation_id, success=False,
                         details=f"{step.name}: {message}", point="event:completed-failed")
    except OSError as unrecorded:
        # A full disk fails this too; the step's own error is the one to report. The
        # journal on disk is whole (written atomically) and resumes the rotation.
        log.error("rotation %s: the failure could not be recorded (%s); the server may "
                  "not hear of it", rotation.rotation_id, unrecorded)
    raise RotationFailed(step, message, hint) from err


def _complete(ctx: Context) -> None:
    rotation = ctx.rotation
    ctx.events.queue(events_mod.COMPLETED, rotation.rotation_id, success=True, point="event:completed")
    finished = ctx.clock()
    for rotation_id in [rotation.rotation_id, *rotation.superseded]:
        ctx.state.completed.append({
            "rotation_id": rotation_id, "success": True, "finished": finished,
            **({"satisfied_by": rotation.rotation_id} if rotation_id != rotation.rotation_id else {}),
        })
    ctx.state.current = None
    ctx.save(point="journal:completed")
    log.info("rotation %s: completed; the device now uses %s", rotation.rotation_id,
             ctx.keys.describe()["file"])


def event_identity(ctx: Context):
    """The identity the gateway accepts for event delivery right now.

    Until confirm has succeeded the gateway knows the old certificate (and
    presenting the new one would switch it over early); afterwards, the one
    sota.toml names.
    """
    current = ctx.state.current
    if current is not None and current.step <= CONFIRM_INDEX:
        return ctx.old_identity()
    return ctx.keys.live_identity()


def deliver_events(ctx: Context) -> bool:
    """One short attempt to deliver the queued events; never raises."""
    delivery = Deadline(EVENTS_DEADLINE, ctx.deadline.clock)
    identities = []

    def post(batch: list[dict]) -> None:
        # Found here, where a failure only keeps the events queued: a token-held
        # identity may be unreachable (the very reason a run failed).
        if not identities:
            identities.append(event_identity(ctx))
        identity = identities[0]
        left = delivery.left()
        if left <= 0:
            raise StepError(f"event delivery took its {EVENTS_DEADLINE:g} s",
                            hint="the events stay queued for a later run")
        # Not bound by the run's deadline, which may have passed: ``delivery`` is the bound.
        reply = ctx.gateway(identity, "POST", "/events", point="events", json=batch, attempts=1,
                            timeout=EVENTS_REPLY_DEADLINE, reply_within=min(EVENTS_REPLY_DEADLINE, left),
                            run=Deadline(None, delivery.clock))
        if reply.status not in range(200, 205):
            raise StepError(f"POST /events answered {reply.status}: {reply.first_line()!r}",
                            hint="the events stay queued for a later run")

    return ctx.events.deliver(post)
