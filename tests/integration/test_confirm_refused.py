"""The gateway refuses the new certificate: the device goes back to its old identity.

Made real: the rotation stops (SIGKILL) right after finalize, then the key the
gateway expects is changed behind the device's back (another next_pubkey is
announced with the old identity), so GET /device with the new certificate
gets 403 from the real gateway.
"""

from __future__ import annotations

import json
import signal

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agentdevice import (
    active_identity, assert_rotated, decrypt_map, event_lines, fake_systemctl, load_key, new_device,
    run_agent,
)

pytestmark = pytest.mark.timeout(180)


def finalized_then_refused(backend, tmp_path, name: str, rotation_id: str):
    """A device stopped right after finalize, whose new key the gateway no longer expects."""
    device, old = new_device(backend, tmp_path, name, device_values={"token": "abc"},
                             local_values={"token": "abc"})
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)
    killed = run_agent(device, "rotate", "--rotation-id", rotation_id, bin_dir=bin_dir,
                       env={"CERTROTATE_CRASH_AT": "journal:finalize"})
    assert killed.returncode == -signal.SIGKILL
    assert active_identity(device)[0].name == f"pkey-{rotation_id}.pem"
    other = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    announced = backend.gateway(device, "PATCH", "/device", key=old.key, cert=old.cert,
                                json={"next_pubkey": other})
    assert announced.status_code == 200, announced.text
    return device, old, bin_dir


def test_refused_certificate_reverts_then_resumes(backend, tmp_path):
    device, old, bin_dir = finalized_then_refused(backend, tmp_path, "dev-r", "certs-7")

    failed = run_agent(device, "check", bin_dir=bin_dir)
    assert failed.returncode == 1, failed.stderr
    assert "Confirm new certificate with gateway" in failed.stderr
    assert "refused the new certificate" in failed.stderr
    assert "what to do:" in failed.stderr
    # Back on the old identity, which the gateway still accepts; local config readable by it.
    key_file, cert_file = active_identity(device)
    assert key_file == old.device_key_file and key_file.read_bytes() == old.key_pem
    assert backend.gateway(device, "GET", "/device").status_code == 200
    local = json.loads((device / "var/sota/config.encrypted").read_text())
    assert decrypt_map(local, load_key(key_file)) == {"token": "abc"}
    calls = (bin_dir / "systemctl.log").read_text()
    assert calls.count("restart aktualizr-lite.service fioconfig.service") == 2  # new, then old again
    # Resumable: the journal keeps the rotation with the error.
    status = json.loads(run_agent(device, "status", "--json", bin_dir=bin_dir).stdout)
    assert status["rotation"]["id"] == "certs-7"
    assert status["rotation"]["last_error"]["step"] == "Confirm new certificate with gateway"
    lines = event_lines(backend, "dev-r", "certs-7")
    assert any("Confirm new certificate with gateway" in line and "Failed!" in line for line in lines)
    assert any("CertRotationCompleted" in line and "Failed!" in line for line in lines)

    # The next run announces the new key again and completes.
    resumed = run_agent(device, "rotate", bin_dir=bin_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert_rotated(backend, device, old, device_values={"token": "abc"}, local_values={"token": "abc"})
    assert "CertRotationCompleted" in event_lines(backend, "dev-r", "certs-7")[-1]
    assert "Succeed" in event_lines(backend, "dev-r", "certs-7")[-1]


@pytest.mark.bad_input("power cut while going back to the old identity")
def test_a_revert_cut_short_resumes_from_the_lock_step_and_keeps_the_identity(backend, tmp_path):
    """Killed just after sota.toml is pointed back at the old identity: the journal already
    says "resume from the lock step", so the next run installs the new identity again,
    and never confirms and retires while sota.toml names the old one."""
    device, old, bin_dir = finalized_then_refused(backend, tmp_path, "dev-rc", "certs-8")
    cut = run_agent(device, "check", bin_dir=bin_dir, env={"CERTROTATE_CRASH_AT": "confirm:revert-sota-0"})
    assert cut.returncode == -signal.SIGKILL
    assert active_identity(device)[0] == old.device_key_file
    assert old.device_key_file.read_bytes() == old.key_pem
    # Before the fix the journal still said "confirm": the next run got a 200 for the new
    # certificate (it is valid once announced again) and retired the key sota.toml named.
    resumed = run_agent(device, "check", bin_dir=bin_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert "step 2/8: Lock device configuration on server" in resumed.stderr
    assert_rotated(backend, device, old, device_values={"token": "abc"}, local_values={"token": "abc"})
