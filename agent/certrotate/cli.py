"""The ``certrotate`` command.

Exit codes (docs/contracts.md): 0 done or nothing due; 1 a step failed (the
run's deadline passing included), the rotation stays resumable; 2 usage or
configuration error; 3 another agent holds the lock; 4 the EST enrollment is
still pending (202) when the run stops waiting for it, retry later; 5 the clock
cannot be right (before the agent's release or the certificate's notBefore),
nothing was started.

``check`` is what a systemd timer runs often: with nothing due it reads two
small files and returns, importing neither requests nor cryptography (the
heavy modules are imported inside the functions that need them).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import json
from typing import Callable

from . import anchors, policy
from .config import ConfigError, Root, check_est_url, load_agent, load_sota

log = logging.getLogger("certrotate")

EXIT_DONE, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED, EXIT_WAITING, EXIT_WRONG_CLOCK = 0, 1, 2, 3, 4, 5

# How long `handler` waits for another certrotate run to release the lock (seconds).
HANDLER_LOCK_WAIT = 300.0


class Edges:
    """What the agent touches outside itself, passed in so tests can drive it.

    ``clock`` is wall time, ``monotonic`` measures deadlines; ``systemd`` is a
    certrotate.systemd.Systemd, None meaning the real systemctl.
    """

    def __init__(self, root: Root, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep, systemd=None,
                 monotonic: Callable[[], float] = time.monotonic):
        self.root = root
        self.clock = clock
        self.sleep = sleep
        self.systemd = systemd
        self.monotonic = monotonic


def open_context(edges: Edges, lock_wait: float = 0.0):
    """Load the configuration, take the lock (trying for ``lock_wait`` seconds), load
    the journal: ready to rotate. The run's deadline starts once the lock is held."""
    from . import fsutil, keystore
    from .deadline import Deadline
    from .events import EventQueue, current_target
    from .journal import Journal
    from .step import Context
    from .systemd import Systemd

    root = edges.root
    agent = load_agent(root)
    sota = load_sota(root)
    journal = Journal(root(agent.state_dir))
    journal.lock(lock_wait)
    keys = keystore.open_store(root, sota, agent, journal)
    directories = {journal.dir, root(agent.config_dir), *keys.work_dirs()}
    directories |= {root(os.path.dirname(origin)) for origin in sota.origins.values()}
    directories.add(root(os.path.dirname(sota.ca_file)))
    for directory in directories:
        for leftover in fsutil.remove_stale_temps(directory):
            log.info("removed %s, left by an interrupted write", leftover)
    state = journal.load()
    from .rotation import FINALIZE_INDEX, STEPS

    if state.current is not None:
        keystore.for_rotation(keys, state.current, installed=state.current.step >= FINALIZE_INDEX)
    target = current_target(root(sota.storage_path) / "current-target")
    return Context(
        root=root, sota=sota, agent=agent, journal=journal, state=state,
        events=EventQueue(journal.dir, clock=edges.clock, target=target),
        systemd=edges.systemd or Systemd(), keys=keys, clock=edges.clock, sleep=edges.sleep,
        deadline=Deadline(agent.run_deadline, edges.monotonic), step_keys=tuple(step.key for step in STEPS),
    )


def rotate(edges: Edges, rotation_id: str | None, est_server: str | None, reason: str,
           *, run_here: bool = True, lock_wait: float = 0.0, request: dict | None = None) -> int:
    """Resume the rotation in progress, or begin one; deliver the queued events.

    With ``run_here`` false the request is only journaled, for another run to carry out.
    ``request`` is what a new rotation is told of where its identity goes (rotation.begin).
    """
    from . import rotation

    ctx = open_context(edges, lock_wait)
    wrong_clock = None
    try:
        # On a wrong clock a request is still journaled (fioconfig calls its handler
        # once per change: it must not be lost), but nothing runs.
        cert_file = ctx.keys.live_cert_file()
        state_dir = edges.root(ctx.agent.state_dir)
        # Not cached here: a rotation writes nothing before its journal entry (but the
        # certificate a token holds, exported for reading).
        validity = policy.cached_validity(state_dir, cert_file) or policy.parse_validity(cert_file)
        wrong_clock = policy.wrong_clock(validity, edges.clock())
        if wrong_clock and not (rotation_id or ctx.state.current):
            raise wrong_clock
        completed = ctx.state.completed_ids()
        if ctx.state.current is not None:
            if rotation_id and rotation_id in completed:
                log.info("rotation %s already completed; resuming %s", rotation_id,
                         ctx.state.current.rotation_id)
            elif rotation_id:
                rotation.supersede(ctx, rotation.check_rotation_id(rotation_id))
            if est_server:
                rotation.redirect_est(ctx, est_server)
            if not wrong_clock:
                log.info("rotation %s: resuming at step %d", ctx.rotation.rotation_id, ctx.rotation.step)
        elif rotation_id and rotation_id in completed:
            log.info("rotation %s already completed: nothing to do", rotation_id)
            return EXIT_DONE
        else:
            server = est_server or ctx.agent.est_server
            if not server:
                raise ConfigError(
                    "no EST server configured",
                    hint="set [est] server in /etc/certrotate/certrotate.toml or pass --est-server URL",
                )
            rotation.begin(ctx, rotation_id or f"certs-{int(edges.clock())}", server, reason, request)
        if wrong_clock:
            raise wrong_clock
        if run_here:
            server = ctx.rotation.est_server
            rotation.run(ctx)
            # A new certificate of a new device CA during a root rollover: the device learns
            # the new root now, not at tomorrow's check (by then the old one may be retired).
            _log_anchor_update(ctx, server)
        return EXIT_DONE
    finally:
        if not wrong_clock:  # on a wrong clock every server certificate looks not yet valid
            rotation.deliver_events(ctx)
        ctx.journal.unlock()


def cmd_rotate(args, edges: Edges) -> int:
    est_server = args.est_server and check_est_url(args.est_server, "--est-server")
    return rotate(edges, args.rotation_id, est_server, args.reason)


def cmd_check(args, edges: Edges) -> int:
    root = edges.root
    agent = load_agent(root)
    state_dir = root(agent.state_dir)
    if not _rotation_in_progress(state_dir):
        if _events_queued(state_dir):
            # Events a gateway keeps refusing must not stop renewals: the policy still applies.
            deliver_only(edges)
        sota = load_sota(root)
        cert_file = _live_cert_file(root, sota, agent)
        validity = policy.cached_validity(state_dir, cert_file) or policy.read_validity(state_dir, cert_file)
        wrong_clock = policy.wrong_clock(validity, edges.clock())
        if wrong_clock:
            raise wrong_clock
        anchors_failed = (agent.est_server is not None and anchors.due(state_dir, edges.clock())
                          and update_anchors(edges) != EXIT_DONE)
        why = policy.due(validity, edges.clock(), agent.lifetime_fraction, agent.max_age_days)
        if why is None:
            return EXIT_FAILED if anchors_failed else EXIT_DONE
        log.info("certificate %s is due for renewal: %s", sota.cert_file or "in the token", why)
    return rotate(edges, None, None, "renewal policy")


def cmd_anchors(args, edges: Edges) -> int:
    root = edges.root
    agent = load_agent(root)
    cert_file = _live_cert_file(root, load_sota(root), agent)
    wrong_clock = policy.wrong_clock(policy.read_validity(root(agent.state_dir), cert_file), edges.clock())
    if wrong_clock:  # no certificate's validity can be judged on it, a cross-certificate's neither
        raise wrong_clock
    return update_anchors(edges, say_unchanged=True)


def update_anchors(edges: Edges, say_unchanged: bool = False) -> int:
    """Bring the trust anchor file up to date (anchors.update); failures are logged, not raised,
    so that they never stand in the way of a renewal."""
    ctx = open_context(edges)
    try:
        if ctx.state.current is not None:
            log.info("trust anchors: not checked while rotation %s is in progress",
                     ctx.state.current.rotation_id)
            return EXIT_DONE
        return _log_anchor_update(ctx, None, say_unchanged)
    finally:
        ctx.journal.unlock()


def _log_anchor_update(ctx, est_server: str | None, say_unchanged: bool = False) -> int:
    """Run the anchor update; log what it did or why it failed, with what to do."""
    try:
        done = anchors.update(ctx, est_server)
    except anchors.AnchorError as err:
        log.error("error: %s", err.args[0])
        log.error("what to do: %s", err.hint)
        return err.exit_code
    if done or say_unchanged:
        log.info("trust anchors: %s", done or "unchanged")
    return EXIT_DONE


def _live_cert_file(root: Root, sota, agent):
    """The live certificate as a file, without the lock or the journal (the fast path)."""
    if sota.p11 is None:
        return root(sota.cert_file)
    from .journal import Journal
    from .tokenkeys import TokenKeyStore

    # The certificate is exported into the state dir: under the lock, as every write there.
    journal = Journal(root(agent.state_dir))
    journal.lock()
    try:
        return TokenKeyStore(root, sota, agent, journal).live_cert_file()
    finally:
        journal.unlock()


def _rotation_in_progress(state_dir) -> bool:
    """Whether the journal names a rotation in progress, read without the journal module
    (the fast path); anything odd in it sends ``check`` down the full path, which reports it."""
    try:
        with open(state_dir / "state.json", "rb") as f:
            return json.load(f).get("current") is not None
    except FileNotFoundError:
        return False
    except (OSError, ValueError, AttributeError):
        return True


def _events_queued(state_dir) -> bool:
    try:
        return any(entry.name.endswith(".json") for entry in os.scandir(state_dir / "events"))
    except FileNotFoundError:
        return False


def deliver_only(edges: Edges) -> None:
    """Deliver the events an earlier run could not (one attempt; failures are logged)."""
    from . import rotation

    ctx = open_context(edges)
    try:
        rotation.deliver_events(ctx)
    finally:
        ctx.journal.unlock()


def cmd_handler(args, edges: Edges) -> int:
    config_file = os.environ.get("CONFIG_FILE")
    if not config_file:
        raise ConfigError(
            "CONFIG_FILE is not set",
            hint="certrotate handler is fioconfig's on-changed handler for fio-rotate-certs; "
            "use certrotate rotate to run a rotation by hand",
        )
    try:
        with open(config_file, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise ConfigError(f"cannot read CONFIG_FILE {config_file}: {err.strerror}",
                          hint="check the fio-rotate-certs config file") from err
    settings = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            settings[name.strip()] = value.strip()
    missing = [name for name in ("ESTSERVER", "ROTATIONID") if not settings.get(name)]
    if missing:
        raise ConfigError(
            f"{config_file} sets no {' and no '.join(missing)}",
            hint="send the rotation again with fioctl devices config rotate-certs",
        )
    rotation_id = settings["ROTATIONID"]
    est_server = check_est_url(settings["ESTSERVER"], f"ESTSERVER in {config_file}")
    request = {}
    for setting, name in (("PKEYIDS", "key_ids"), ("CERTIDS", "cert_ids")):
        if settings.get(setting):
            from .tokenkeys import check_ids

            request[name] = check_ids(settings[setting].split(","), setting, config_file)
    # fioconfig runs a handler once per config change: a request turned away because
    # the timer's run holds the lock would be lost, so wait for that run a while.
    if os.environ.get("INVOCATION_ID"):
        # Under systemd, fioconfig runs this handler inside fioconfig.service, a unit
        # the rotation restarts: the restart would kill the rotation half way. Journal
        # the request and let certrotate.service carry it out in its own unit.
        code = rotate(edges, rotation_id, est_server, "fio-rotate-certs", run_here=False,
                      lock_wait=HANDLER_LOCK_WAIT, request=request)
        state_dir = edges.root(load_agent(edges.root).state_dir)
        if code != EXIT_DONE or not _rotation_in_progress(state_dir) or hand_over(edges):
            return code
    return rotate(edges, rotation_id, est_server, "fio-rotate-certs", lock_wait=HANDLER_LOCK_WAIT,
                  request=request)


def hand_over(edges: Edges) -> bool:
    """Start certrotate.service to run the journaled rotation; False if it cannot be started."""
    from .systemd import AGENT_SERVICE, Systemd, SystemdError

    try:
        (edges.systemd or Systemd()).start_no_block(AGENT_SERVICE)
    except SystemdError as err:
        log.info("cannot hand the rotation to %s (%s): running it here", AGENT_SERVICE, err.args[0])
        return False
    log.info("rotation handed to %s", AGENT_SERVICE)
    return True


def cmd_status(args, edges: Edges) -> int:
    from . import status

    data = status.collect(edges.root, edges.clock())
    print(status.to_json(data) if args.json else status.render(data))
    return EXIT_DONE


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="certrotate",
        description="Rotate the device's TLS client key and certificate (EST re-enrollment).",
        epilog="exit codes: 0 done or nothing due; 1 a step failed (resumable); 2 usage or "
        "configuration error; 3 another certrotate is running; 4 EST enrollment still pending, "
        "run again later",
    )
    top.add_argument("--root", default="/", metavar="DIR",
                     help="treat DIR as the device's / (every absolute device path is taken under it)")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    rotate_cmd = commands.add_parser("rotate", help="run a rotation now, or resume the one in progress")
    rotate_cmd.add_argument("--est-server", metavar="URL", help="EST server (default: certrotate.toml)")
    rotate_cmd.add_argument("--rotation-id", metavar="ID", help="rotation id (default: certs-<unix time>)")
    rotate_cmd.add_argument("--reason", default="", help="why (recorded in the journal)")
    rotate_cmd.set_defaults(func=cmd_rotate)
    commands.add_parser(
        "check", help="resume an unfinished rotation, or start one when the certificate is due"
    ).set_defaults(func=cmd_check)
    commands.add_parser(
        "handler", help="fioconfig's on-changed handler for fio-rotate-certs (reads $CONFIG_FILE)"
    ).set_defaults(func=cmd_handler)
    commands.add_parser(
        "anchors", help="update the trust anchors from the EST server's /cacerts now (check does daily)"
    ).set_defaults(func=cmd_anchors)
    status_cmd = commands.add_parser("status", help="show the certificate and the rotation state")
    status_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    status_cmd.set_defaults(func=cmd_status)
    return top


def main(argv: list[str] | None = None, *, clock: Callable[[], float] = time.time,
         sleep: Callable[[float], None] = time.sleep, systemd=None,
         monotonic: Callable[[], float] = time.monotonic) -> int:
    args = parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("certrotate: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    edges = Edges(Root(args.root), clock=clock, sleep=sleep, systemd=systemd, monotonic=monotonic)
    try:
        return args.func(args, edges)
    except OSError as err:
        # Outside a step (lock, journal, state and config directories): the operator
        # needs the path and the reason, not a traceback.
        log.error("error: %s", err)
        log.error("what to do: check that path (permissions, free space, a file where a "
                  "directory belongs) and run certrotate again")
        return EXIT_USAGE
    except Exception as err:
        hint = getattr(err, "hint", None)
        if hint is None:
            raise
        code = getattr(err, "exit_code", EXIT_USAGE)
        log.error("error: %s", err.args[0] if err.args else err)
        log.error("what to do: %s", hint)
        return code


if __name__ == "__main__":
    sys.exit(main())
