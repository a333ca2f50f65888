"""Rotation on loopback: the real agent against the real backend.

`certrotate rotate` is timed end to end with its per-step breakdown (service
restart excluded: the device's restart list is emptied); beside it, in the
same run, the openssl + curl baseline that only re-enrolls; and how rotation
time grows with the number of encrypted config values."""

from __future__ import annotations

import itertools
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from measure import ChildRun, median, run_child, summarize_runs
from softhsm import SoftHsm, register_token_device
from steps import PointClock, breakdown

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
AGENT = REPO / ".venv/bin/certrotate"


def clear_restart_units(device_root: Path) -> None:
    """Point the agent's restart step at no units, so no systemd is timed."""
    toml = device_root / "etc/certrotate/certrotate.toml"
    text = toml.read_text()
    if re.search(r"(?m)^\[services\]", text):
        text = re.sub(r"(?m)^restart\s*=.*$", "restart = []", text)
        if not re.search(r"(?m)^restart = \[\]$", text):
            text = text.replace("[services]", "[services]\nrestart = []", 1)
    else:
        text = text.rstrip("\n") + "\n\n[services]\nrestart = []\n"
    toml.write_text(text)


def agent_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTROTATE_")}
    env.update(extra or {})
    return env


def run_agent(device_root: Path, *command: str, clock: PointClock | None = None,
              env: dict | None = None) -> ChildRun:
    env = agent_env({**(env or {}), **({"CERTROTATE_TRACE_POINTS": str(clock.path)} if clock else {})})
    return run_child([str(AGENT), "--root", str(device_root), *command], env=env)


_rotations = itertools.count(1)


def timed_rotation(device_root: Path, clock: PointClock, env: dict | None = None) -> tuple[ChildRun, dict[str, float]]:
    """One `certrotate rotate`, with an id of its own (the default id,
    certs-<unix seconds>, would repeat within a second and do nothing)."""
    clock.take()  # drop anything left from an earlier run
    rotation_id = f"certs-bench-{os.getpid()}-{next(_rotations)}"
    run = run_agent(device_root, "rotate", "--rotation-id", rotation_id, clock=clock, env=env).check()
    phases = breakdown(run.started, clock.take(), run.started + run.wall_s)
    return run, phases


def repeated_rotations(device_root: Path, repeats: int, clock: PointClock,
                       after_each: Callable[[int], object] | None = None) -> tuple[dict, dict[str, float]]:
    """``repeats`` rotations of one device: the medians of wall, CPU and peak
    RSS, and the median seconds per step."""
    runs, phases = [], []
    for i in range(repeats):
        run, run_phases = timed_rotation(device_root, clock)
        runs.append(run)
        phases.append(run_phases)
        if after_each:
            after_each(i)
    return summarize_runs(runs), median_phases(phases)


def median_phases(all_phases: list[dict[str, float]]) -> dict[str, float]:
    names: list[str] = []
    for phases in all_phases:
        names += [n for n in phases if n not in names]
    return {n: median([p.get(n, 0.0) for p in all_phases]) for n in names}


def bench_rotation(backend, work: Path, repeats: int, clock: PointClock) -> dict:
    """Rotate one device ``repeats`` times (each rotation starts from the
    identity the previous one installed), and re-enroll another device as
    many times with the openssl + curl baseline, interleaved so both see the
    same machine load."""
    device = backend.register("bench-rotate", work / "bench-rotate")
    clear_restart_units(device)
    base_device = backend.register("bench-baseline", work / "bench-baseline")
    # The same rotation of an identity held in a SoftHSM2 token (ids alternate 01/03 <-> 07/09).
    hsm = SoftHsm(work / "bench-token-hsm")
    token_device = register_token_device(backend, hsm, "bench-token", work / "bench-token")
    clear_restart_units(token_device)
    baselines: list[ChildRun] = []
    token_runs: list[ChildRun] = []
    token_phases: list[dict[str, float]] = []

    def after_each(i: int) -> None:
        baselines.append(baseline_once(base_device, backend.est_url, work / f"baseline-{i}"))
        run, phases = timed_rotation(token_device, clock, env=hsm.env)
        token_runs.append(run)
        token_phases.append(phases)

    rotate, steps = repeated_rotations(device, repeats, clock, after_each=after_each)
    baseline = summarize_runs(baselines)
    token = summarize_runs(token_runs)
    return {
        "rotate": rotate,
        "rotate_steps_s": steps,
        "rotate_token": token,
        "rotate_token_steps_s": median_phases(token_phases),
        "ratio_token_to_file": token["wall_s"] / rotate["wall_s"],
        "baseline_openssl_curl": baseline,
        "ratio_rotate_to_baseline": rotate["wall_s"] / baseline["wall_s"],
    }


def baseline_once(device_root: Path, est_url: str, work: Path) -> ChildRun:
    """One EST re-enrollment by openssl + curl; the wall time covers every
    process the script starts (bash, 5 openssl, curl, base64)."""
    run = run_child(["bash", str(BENCH_DIR / "est_baseline.sh"), str(device_root), est_url, str(work)])
    shutil.rmtree(work, ignore_errors=True)
    return run.check()
