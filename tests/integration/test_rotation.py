"""A full rotation by the real agent against the real backend, over TLS on loopback."""

from __future__ import annotations

import json
import os
import re

import pytest

from backend import ROTATION_EVENTS
from agentdevice import active_identity, assert_rotated, event_lines, fake_systemctl, new_device, run_agent

pytestmark = pytest.mark.timeout(180)


def test_full_rotation(backend, tmp_path):
    local = {"wifi-psk": "s3cret", "local-only": "x"}
    device, old = new_device(backend, tmp_path, "dev-1", device_values={"wifi-psk": "s3cret", "api-token": "t0ken"},
                             local_values=local)
    # fioconfig set this mtime from the Date of the download; it is its next If-Modified-Since.
    config_file = device / "var/sota/config.encrypted"
    os.utime(config_file, (1_700_000_000, 1_700_000_000))
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir, active=("aktualizr-lite.service",))

    result = run_agent(device, "rotate", "--rotation-id", "certs-1700000000", bin_dir=bin_dir)
    assert result.returncode == 0, result.stderr
    assert config_file.stat().st_mtime == 1_700_000_000, "re-encryption hid server changes from fioconfig"

    assert_rotated(backend, device, old, device_values={"wifi-psk": "s3cret", "api-token": "t0ken"},
                   local_values=local)
    key_file, cert_file = active_identity(device)
    assert key_file.name == "pkey-certs-1700000000.pem"
    assert cert_file.name == "client-certs-1700000000.pem"
    # Only the active unit was restarted.
    calls = (bin_dir / "systemctl.log").read_text().splitlines()
    assert "restart aktualizr-lite.service" in calls
    assert not any(c.startswith("restart") and "fioconfig" in c for c in calls)
    # Every step's event reached the server, in order, all successful.
    lines = event_lines(backend, "dev-1", "certs-1700000000")
    names = [re.match(r".* : (.*)\(.*\) -> (Succeed|Failed!)", line).group(1, 2) for line in lines]
    assert names == [(name, "Succeed") for name in ROTATION_EVENTS]
    # sota.toml kept every other byte.
    assert "tls_cacert_path = \"/var/sota/root.crt\"" in (device / "var/sota/sota.toml").read_text()
    # One line per step on stderr, no key material.
    assert "PRIVATE KEY" not in result.stderr
    assert len(re.findall(r"step \d/8", result.stderr)) == 9

    # The same rotation id again is a no-op; check with nothing due is quiet.
    again = run_agent(device, "rotate", "--rotation-id", "certs-1700000000", bin_dir=bin_dir)
    assert again.returncode == 0 and "already completed" in again.stderr
    check = run_agent(device, "check", bin_dir=bin_dir)
    assert (check.returncode, check.stderr) == (0, "")
    status = json.loads(run_agent(device, "status", "--json", bin_dir=bin_dir).stdout)
    assert status["rotation"] is None
    assert status["last_completed"]["rotation_id"] == "certs-1700000000"
    assert status["certificate"]["file"] == "/var/sota/client-certs-1700000000.pem"


def test_handler_runs_the_rotation_fioconfig_asks_for(backend, tmp_path):
    device, old = new_device(backend, tmp_path, "dev-2")
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)
    config_file = tmp_path / "fio-rotate-certs"
    config_file.write_text(f"ESTSERVER={backend.est_url}\nPKEYIDS=01,07\nCERTIDS=03,09\nROTATIONID=certs-42\n")

    result = run_agent(device, "handler", bin_dir=bin_dir, env={"CONFIG_FILE": str(config_file)})
    assert result.returncode == 0, result.stderr
    assert_rotated(backend, device, old, device_values={}, local_values=None)
    # fioconfig runs the handler again on the same file: nothing happens.
    key_before = active_identity(device)
    again = run_agent(device, "handler", bin_dir=bin_dir, env={"CONFIG_FILE": str(config_file)})
    assert again.returncode == 0, again.stderr
    assert active_identity(device) == key_before


def test_handler_under_systemd_hands_the_rotation_to_its_own_unit(backend, tmp_path):
    """fioconfig runs handlers inside fioconfig.service, which the rotation restarts:
    under systemd the handler journals the request and starts certrotate.service."""
    device, old = new_device(backend, tmp_path, "dev-3")
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)
    config_file = tmp_path / "fio-rotate-certs"
    config_file.write_text(f"ESTSERVER={backend.est_url}\nROTATIONID=certs-43\n")
    under_systemd = {"CONFIG_FILE": str(config_file), "INVOCATION_ID": "0123456789abcdef"}

    handed = run_agent(device, "handler", bin_dir=bin_dir, env=under_systemd)
    assert handed.returncode == 0, handed.stderr
    assert "rotation handed to certrotate.service" in handed.stderr
    assert "start --no-block certrotate.service" in (bin_dir / "systemctl.log").read_text()
    assert active_identity(device)[1] == device / "var/sota/client.pem"  # nothing rotated yet
    status = json.loads(run_agent(device, "status", "--json", bin_dir=bin_dir).stdout)
    assert (status["rotation"]["id"], status["rotation"]["step"]) == ("certs-43", 0)

    # What certrotate.service runs.
    check = run_agent(device, "check", bin_dir=bin_dir)
    assert check.returncode == 0, check.stderr
    assert_rotated(backend, device, old, device_values={}, local_values=None)

    # The same file again: nothing to carry out, so nothing is handed over.
    again = run_agent(device, "handler", bin_dir=bin_dir, env=under_systemd)
    assert again.returncode == 0, again.stderr
    assert "certs-43 already completed" in again.stderr and "handed" not in again.stderr
    assert (bin_dir / "systemctl.log").read_text().count("start --no-block") == 1


def test_handler_runs_the_rotation_itself_when_its_unit_cannot_start(backend, tmp_path):
    device, old = new_device(backend, tmp_path, "dev-4")
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)
    systemctl = bin_dir / "systemctl"
    systemctl.write_text(systemctl.read_text().replace(
        "#!/bin/sh\n", '#!/bin/sh\n[ "$1" = start ] && { echo "Unit certrotate.service not found." >&2; exit 5; }\n'))
    config_file = tmp_path / "fio-rotate-certs"
    config_file.write_text(f"ESTSERVER={backend.est_url}\nROTATIONID=certs-44\n")

    result = run_agent(device, "handler", bin_dir=bin_dir,
                       env={"CONFIG_FILE": str(config_file), "INVOCATION_ID": "0123456789abcdef"})
    assert result.returncode == 0, result.stderr
    assert "cannot hand the rotation to certrotate.service" in result.stderr
    assert_rotated(backend, device, old, device_values={}, local_values=None)
