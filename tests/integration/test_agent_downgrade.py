"""An OTA rollback in the middle of a rotation (issue 10, item 4): an older agent meets the
journal a newer one wrote, and /var/sota stays.

The older agent is the real one: this repository's agent at history.OLDER_RELEASE (the last
release whose journal was schema 1 only), taken from git history and run as a
child process against the same device tree. The rule (agent/certrotate/journal.py):
a journal is written in the oldest schema that holds it; a newer schema is
refused, with a hint, and left as it is.
- a file rotation (schema 1): the older agent resumes and completes it;
- a token rotation (schema 2): the older agent refuses it, touches neither the
  journal nor the token, the live identity keeps working, and the newer agent,
  once back, completes it;
- a journal of a schema from the future (fixture state-v3.json): this agent
  does the same as the older one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentdevice import assert_rotated, fake_systemctl, new_device, reaches_gateway, run_agent, stop_after_step_4
from history import older_agent_package
from softhsm import SoftHsm, gateway_get, register_token_device

pytestmark = pytest.mark.timeout(300)

FIXTURES = Path(__file__).resolve().parents[1] / "agent/fixtures"


@pytest.fixture(scope="module")
def older_agent(tmp_path_factory) -> dict:
    """The environment that runs OLDER_RELEASE's agent (its package first on PYTHONPATH)."""
    package = older_agent_package(tmp_path_factory.mktemp("older-agent"))
    env = {"PYTHONPATH": str(package.parent)}
    probe = subprocess.run([sys.executable, "-c", "import certrotate; print(certrotate.__file__)"],
                           capture_output=True, text=True, env={**os.environ, **env})
    assert probe.stdout.startswith(str(package)), probe  # the older agent, not the installed one
    return env


def run_older(device, *args, bin_dir, older_agent, env=None):
    return run_agent(device, *args, bin_dir=bin_dir, env={**(env or {}), **older_agent},
                     command=[sys.executable, "-m", "certrotate.cli"])


def test_the_older_agent_completes_a_file_rotation_the_newer_one_began(backend, tmp_path, older_agent):
    device, old = new_device(backend, tmp_path, "dev-rolled-back", device_values={"k": "v"})
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)
    stop_after_step_4(device, "certs-1700000000", bin_dir=bin_dir)
    assert json.loads((device / "var/sota/certrotate/state.json").read_text())["schema"] == 1
    assert reaches_gateway(backend, device)

    older = run_older(device, "check", bin_dir=bin_dir, older_agent=older_agent)
    assert older.returncode == 0, older.stderr
    assert "resuming at step 5" in older.stderr
    assert_rotated(backend, device, old, device_values={"k": "v"}, local_values=None)
    # The newer agent, back after the next update, finds the rotation done.
    newer = run_agent(device, "rotate", "--rotation-id", "certs-1700000000", bin_dir=bin_dir)
    assert newer.returncode == 0 and "already completed" in newer.stderr, newer.stderr


@pytest.mark.bad_input("journal of a newer agent")
def test_the_older_agent_leaves_a_token_rotation_alone_until_the_newer_one_returns(
        backend, tmp_path, older_agent):
    hsm = SoftHsm(tmp_path / "hsm")
    device = register_token_device(backend, hsm, "tok-rolled-back", tmp_path / "tok")
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)
    stop_after_step_4(device, "certs-1", bin_dir=bin_dir, env=hsm.env)
    journal = device / "var/sota/certrotate/state.json"
    written, objects = journal.read_bytes(), hsm.objects()
    assert json.loads(written)["schema"] == 2

    # It knows no token identity: it stops at sota.toml (exit 2, a configuration error),
    # before the journal, whose schema 2 it would refuse too (tests/agent/test_journal.py).
    for command in ("check", "rotate"):  # what the timer and an operator would run
        older = run_older(device, command, bin_dir=bin_dir, older_agent=older_agent, env=hsm.env)
        assert older.returncode == 2 and "Traceback" not in older.stderr, older.stderr
    assert journal.read_bytes() == written and hsm.objects() == objects
    assert gateway_get(backend, hsm, "01", hsm.cert_file("03"))[0] == "HTTP/1.1 200 OK"

    newer = run_agent(device, "check", bin_dir=bin_dir, env=hsm.env)
    assert newer.returncode == 0, newer.stderr
    assert json.loads(journal.read_text())["current"] is None
    assert gateway_get(backend, hsm, "07", hsm.cert_file("09"))[0] == "HTTP/1.1 200 OK"


@pytest.mark.bad_input("journal of a newer agent")
def test_a_journal_of_a_future_schema_is_left_alone_and_the_identity_kept(backend, tmp_path):
    device, _ = new_device(backend, tmp_path, "dev-from-the-future")
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)
    journal = device / "var/sota/certrotate/state.json"
    journal.parent.mkdir(mode=0o700, exist_ok=True)
    journal.write_bytes((FIXTURES / "state-v3.json").read_bytes())
    identity = {p: p.read_bytes() for p in (device / "var/sota").iterdir() if p.is_file()}
    for command in ("check", "rotate", "status"):
        result = run_agent(device, command, bin_dir=bin_dir)
        assert result.returncode == 2, (command, result.stderr)
        assert "newer agent" in result.stderr, result.stderr
    assert journal.read_bytes() == (FIXTURES / "state-v3.json").read_bytes()
    assert {p: p.read_bytes() for p in identity} == identity and reaches_gateway(backend, device)
