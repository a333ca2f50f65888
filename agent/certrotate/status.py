"""``certrotate status``: the current certificate, the rotation in progress, the last one done."""

from __future__ import annotations

import datetime
import json

from . import certs, keystore, pki, policy
from .config import Root, load_agent, load_sota
from .events import EventQueue
from .journal import Journal


def collect(root: Root, now: float) -> dict:
    sota = load_sota(root)
    agent = load_agent(root)
    keys = keystore.open_store(root, sota, agent, Journal(root(agent.state_dir)))
    where = keys.describe()
    cert = certs.load_certs(keys.live_cert_file(), where["file"])[0]
    not_before, not_after = pki.validity(cert)
    moment = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    wrong_clock = policy.wrong_clock(policy.Validity(not_before.timestamp(), not_after.timestamp()), now)
    state_dir = root(agent.state_dir)
    state = Journal(state_dir).load()
    current = state.current
    return {
        "certificate": {
            **where,
            "subject": cert.subject.rfc4514_string(),
            "serial": format(cert.serial_number, "x"),
            "not_before": not_before.isoformat(),
            "not_after": not_after.isoformat(),
            # Unknown on a clock that cannot be right: no judgement is made on it.
            "days_left": None if wrong_clock else round((not_after - moment).total_seconds() / 86400, 1),
        },
        "clock_problem": str(wrong_clock) if wrong_clock else None,
        "rotation": None if current is None else {
            "id": current.rotation_id,
            "step": current.step,
            "est_server": current.est_server,
            "last_error": current.last_error,
            "superseded": current.superseded,
        },
        "last_completed": state.last_completed(),
        "queued_events": len(EventQueue(state_dir, clock=lambda: now).pending()),
    }


def render(data: dict) -> str:
    from .rotation import STEPS

    cert = data["certificate"]
    lines = [
        f"certificate: {cert['file']}",
        f"  subject:   {cert['subject']}",
        f"  serial:    {cert['serial']}",
        f"  notAfter:  {cert['not_after']} "
        + (f"({cert['days_left']:g} days left)" if cert["days_left"] is not None else "(days left unknown)"),
    ]
    if data["clock_problem"]:
        lines.append(f"clock: {data['clock_problem']}")
    rotation = data["rotation"]
    if rotation is None:
        lines.append("rotation in progress: none")
    else:
        step = rotation["step"]
        name = STEPS[step].name if step < len(STEPS) else "completion"
        lines.append(f"rotation in progress: {rotation['id']} (next step {step}: {name})")
        if rotation["last_error"]:
            error = rotation["last_error"]
            lines.append(f"  last error in '{error['step']}': {error['message']}")
            lines.append(f"  what to do: {error['hint']}")
    last = data["last_completed"]
    if last:
        finished = datetime.datetime.fromtimestamp(last["finished"], datetime.timezone.utc)
        lines.append(f"last completed rotation: {last['rotation_id']} at {finished.isoformat()}")
    else:
        lines.append("last completed rotation: none")
    lines.append(f"events waiting for delivery: {data['queued_events']}")
    return "\n".join(lines)


def to_json(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True)
