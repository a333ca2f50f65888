"""Power cut at every point where the agent persists state or talks to the network.

One clean traced run enumerates the points (CERTROTATE_TRACE_POINTS). Then,
for each of them (all, not a sample), a fresh device on the shared backend
runs `certrotate rotate` in a child process that SIGKILLs itself exactly
there (CERTROTATE_CRASH_AT), and `certrotate check` runs until it finishes.
Each end state must be a good rotation: one active key, sota.toml naming it,
the gateway accepting it and refusing the old one, config decrypting, no stray
secret, and the events ending with CertRotationCompleted success.
"""

from __future__ import annotations

import json
import re
import signal

import pytest

from agentdevice import (
    anchors_of, assert_rotated, event_lines, fake_systemctl, new_device, reaches_gateway, restarts, run_agent,
)

CHECK_RUNS = 5
DEVICE_VALUES = {"db-password": "hunter2"}
LOCAL_VALUES = {"db-password": "hunter2", "wifi": "psk"}


def configured_device(backend, tmp_path, name):
    return new_device(backend, tmp_path, name, device_values=DEVICE_VALUES, local_values=LOCAL_VALUES)


def last_event(backend, name, rotation_id):
    line = event_lines(backend, name, rotation_id)[-1]
    return re.match(r".* : (.*)\(.*\) -> (Succeed|Failed!)", line).group(1, 2)


@pytest.mark.timeout(1200)
def test_every_crash_point_recovers(module_backend, tmp_path):
    backend = module_backend

    def device(name):
        device, old = configured_device(backend, tmp_path, name)
        return device, {}, lambda: assert_rotated(backend, device, old, device_values=DEVICE_VALUES,
                                                  local_values=LOCAL_VALUES)

    points = crash_at_every_point(backend, tmp_path, device)
    for expected in ("journal:start", "est:simplereenroll:send", "est:simplereenroll:reply",
                     "lock:patch-device:reply", "finalize:sota-0", "confirm:new:reply",
                     "retire:old-key", "event:completed", "journal:completed", "events:send"):
        assert expected in points


def crash_at_every_point(backend, tmp_path, make_device) -> list[str]:
    """Trace one clean rotation, then cut the power at each point it reached.

    ``make_device(name)`` registers a fresh device and returns (device root,
    environment for the agent, a check of its good end state)."""
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)
    device, env, check_rotated = make_device("traced")
    trace = tmp_path / "points.txt"
    clean = run_agent(device, "rotate", "--rotation-id", "certs-1", bin_dir=bin_dir,
                      env={**env, "CERTROTATE_TRACE_POINTS": str(trace)})
    assert clean.returncode == 0, clean.stderr
    check_rotated()
    points = trace.read_text().split()
    assert len(points) == len(set(points)), f"crash point names repeat: {points}"

    failures = []
    journaled_from = points.index("journal:start")
    for number, point in enumerate(points):
        name = f"crash-{number}"
        device, env, check_rotated = make_device(name)
        rotation_id = f"certs-{1000 + number}"
        killed = run_agent(device, "rotate", "--rotation-id", rotation_id, bin_dir=bin_dir,
                           env={**env, "CERTROTATE_CRASH_AT": point})
        if killed.returncode != -signal.SIGKILL:
            failures.append(f"{point}: rotate was not killed there (exit {killed.returncode})")
            continue
        # Killed before the request was journaled, nothing of it survives: it is sent
        # again (as fioconfig's handler would be); afterwards `check` resumes the rotation.
        resume = ["check"] if number >= journaled_from else ["rotate", "--rotation-id", rotation_id]
        for _ in range(CHECK_RUNS):
            check = run_agent(device, *resume, bin_dir=bin_dir, env=env)
            if check.returncode == 0:
                break
        else:
            failures.append(f"{point}: check did not finish in {CHECK_RUNS} runs: {check.stderr}")
            continue
        try:
            check_rotated()
            assert last_event(backend, name, rotation_id) == ("CertRotationCompleted", "Succeed")
        except AssertionError as err:
            failures.append(f"{point}: {err}")
    print(f"\ncrash points: {' '.join(points)}")
    print(f"crash points covered: {len(points)} ({len(points) - len(failures)} recovered)")
    assert not failures, "\n".join(failures)
    return points


ANCHOR_DEVICES = 10  # more than the points a trust anchor update reaches


@pytest.mark.timeout(900)
def test_every_trust_anchor_crash_point_recovers(backend, tmp_path):
    """The device's trust anchor update (anchors.py), cut at each of its points, in both
    directions: the new root joining after `ca rollover`, the old one leaving after
    `ca retire-old`. After each cut the device still reaches the gateway with the file it
    holds; the next run ends with the right roots and the units that read them restarted."""
    devices = [backend.register(f"anchors-{n}", tmp_path / f"anchors-{n}") for n in range(ANCHOR_DEVICES + 1)]
    both = ["certrotate-factory root CA", "certrotate-factory root CA 2"]
    backend.cli("ca", "rollover")
    backend.restart()
    covered = anchor_cuts(backend, tmp_path / "join", devices, both)
    for device in devices:  # onto the new device CA, or retire-old refuses
        run = run_agent(device, "rotate", bin_dir=fake_systemctl(tmp_path / "join" / device.name).parent)
        assert run.returncode == 0, run.stderr
    backend.cli("ca", "retire-old")
    backend.restart()
    covered += anchor_cuts(backend, tmp_path / "retire", devices, both[1:])
    assert {"anchors:pending", "anchors:bundle", "anchors:restarted", "anchors:checked"} <= set(covered)


def anchor_cuts(backend, workdir, devices, expected_roots) -> list[str]:
    """Trace one update on devices[0], then cut each of the others at one of its points."""
    traced, *others = devices
    trace = workdir / "points.txt"
    fake_systemctl(workdir / traced.name)
    clean = run_agent(traced, "anchors", bin_dir=workdir / traced.name,
                      env={"CERTROTATE_TRACE_POINTS": str(trace)})
    assert clean.returncode == 0, clean.stderr
    points = trace.read_text().split()
    assert len(points) <= len(others), points
    failures = []
    for point, device in zip(points, others):
        bin_dir = workdir / device.name
        fake_systemctl(bin_dir)
        killed = run_agent(device, "anchors", bin_dir=bin_dir, env={"CERTROTATE_CRASH_AT": point})
        if killed.returncode != -signal.SIGKILL:
            failures.append(f"{point}: not killed there (exit {killed.returncode}): {killed.stderr}")
            continue
        if not reaches_gateway(backend, device):
            failures.append(f"{point}: the device no longer reaches the gateway after the cut")
        resumed = run_agent(device, "anchors", bin_dir=bin_dir)
        state = json.loads((device / "var/sota/certrotate/anchors.json").read_text())
        if resumed.returncode != 0 or anchors_of(device) != expected_roots or state["pending"]:
            failures.append(f"{point}: after the next run: exit {resumed.returncode}, roots {anchors_of(device)}, "
                            f"state {state}: {resumed.stderr}")
        elif not restarts(bin_dir) or not reaches_gateway(backend, device):
            failures.append(f"{point}: units not restarted ({restarts(bin_dir)}) or gateway unreachable")
    print(f"\ntrust anchor crash points ({len(points)}, {len(points) - len(failures)} recovered): {' '.join(points)}")
    assert not failures, "\n".join(failures)
    return points

