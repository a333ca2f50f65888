"""Assertions shared by the QEMU tests: what a completed rotation must leave behind."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from backend import ROTATION_EVENTS
from certrotate import ecies
from qemu_guest import Guest, Identity, guest_est_url
from qemu_timing import stage

# certrotate.toml lines making any certificate due for renewal (older than
# a second), whatever its validity period.
RENEWAL_DUE_AT_ONCE = "\n[renewal]\nlifetime_fraction = 0.000001\nmax_age_days = 0.00001\n"
SECRET_NAME, SECRET_VALUE = "wifi-psk", "correct horse battery staple"


def seed_device_config(backend, name: str, device_tree: Path) -> None:
    """Give the device an encrypted config file, on the server and locally as
    fioconfig keeps it (config.encrypted), so the config steps have work to do."""
    backend.cli("devices", "config", "set", name, f"{SECRET_NAME}={SECRET_VALUE}")
    reply = backend.gateway(device_tree, "GET", "/config")
    reply.raise_for_status()
    local = device_tree / "var/sota/config.encrypted"
    local.write_text(json.dumps(reply.json()))
    local.chmod(0o600)


def assert_online(guest: Guest) -> None:
    """The device reaches the gateway with the identity sota.toml names, and
    the kernel saw no filesystem error."""
    _, cert_path = guest.identity_paths()
    guest.wait_standin_ok(cert_path, timeout=180)
    errors = guest.ssh("dmesg | grep -i 'EXT4-fs error' || true").stdout
    assert not errors.strip(), errors


def gateway_accepts(backend, key: Path, cert: Path) -> bool:
    """Whether the gateway serves GET /device to this identity (a refused
    handshake or an error status both count as refusal)."""
    try:
        return backend.gateway(None, "GET", "/device", key=key, cert=cert).ok
    except requests.exceptions.ConnectionError:
        return False


def rotation_id_from(output: str) -> str:
    found = re.search(r"rotation id (certs-\d+)", output)
    assert found, f"no rotation id in: {output}"
    return found.group(1)


def assert_rotated(guest: Guest, rotation_id: str, old: Identity, workdir: Path,
                   repeats_allowed: bool = False) -> Identity:
    """The rotation completed for real: new files named by sota.toml, online
    with them, the old ones refused and removed, every step reported Succeed,
    the encrypted config readable with the new key. ``repeats_allowed``: after
    a power cut a step may run (and report) twice."""
    new = guest.identity(workdir)
    assert (new.key_path, new.cert_path) == (f"/var/sota/pkey-{rotation_id}.pem",
                                             f"/var/sota/client-{rotation_id}.pem")
    status = guest.status()
    assert status["rotation"] is None, status
    assert status["last_completed"]["rotation_id"] == rotation_id and status["last_completed"]["success"], status
    assert status["queued_events"] == 0, status

    key_mode = guest.ssh(f"stat -c %a {new.key_path}").stdout.strip()
    assert key_mode == "600", f"new key {new.key_path} has mode {key_mode}"
    left = guest.ssh(f"ls {old.key_path} {old.cert_path}", check=False)
    assert left.returncode != 0 and not left.stdout.strip(), f"old key or cert still there: {left.stdout}"

    key = load_pem_private_key(new.key.read_bytes(), None)
    cert = x509.load_pem_x509_certificate(new.cert.read_bytes())
    assert cert.public_key().public_numbers() == key.public_key().public_numbers(), "key and cert do not match"
    assert cert.subject == x509.load_pem_x509_certificate(old.cert.read_bytes()).subject

    assert gateway_accepts(guest.backend, new.key, new.cert), "gateway refuses the new certificate"
    assert not gateway_accepts(guest.backend, old.key, old.cert), "gateway still accepts the old certificate"

    lines = guest.backend.cli("devices", "updates", guest.name, rotation_id).stdout.splitlines()
    event_lines = [line for line in lines if " : " in line]
    reported = [line.split(" : ", 1)[1].rsplit("(", 1)[0] for line in event_lines]
    if repeats_allowed:
        reported = list(dict.fromkeys(reported))
    assert reported == ROTATION_EVENTS, "\n".join(lines)
    assert all(line.endswith("-> Succeed") for line in event_lines), "\n".join(lines)

    local = json.loads(guest.vm.read("/var/sota/config.encrypted"))
    plaintext = ecies.decrypt(key, base64.b64decode(local[SECRET_NAME]["Value"]))
    assert plaintext.decode() == SECRET_VALUE
    return new


def operator_rotation(device: Guest, workdir: Path) -> tuple[str, Identity]:
    """An operator's ``devices config rotate-certs``, delivered by the fioconfig
    stand-in to the installed handler, rotates completely under systemd, and
    both stand-ins are online with the new certificate. Returns the rotation
    id and the new identity."""
    old = device.identity(workdir / "old")
    assert gateway_accepts(device.backend, old.key, old.cert)
    sent = device.backend.cli("devices", "config", "rotate-certs", device.name, "--reason", "QEMU test",
                              "--est-server", guest_est_url(device.backend)).stdout
    rotation_id = rotation_id_from(sent)
    since = device.guest_time()
    with stage(f"{device.name}: operator rotation (fioconfig handler)"):
        result = device.deliver_config()
        assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{device.journal('fioconfig-apply.service')}"
        # Under systemd the handler hands the rotation to certrotate.service (fioconfig's
        # own unit is restarted by it); `systemctl start` joins that unit's running job.
        assert "rotation handed to certrotate.service" in result.stdout + result.stderr
        finished = device.run_certrotate_service()
    assert finished.returncode == 0, device.journal()
    new = assert_rotated(device, rotation_id, old, workdir / "new")
    device.wait_standin_ok(new.cert_path, since=since)
    device.wait_standin_ok(new.cert_path, since=since, name="fioconfig")
    return rotation_id, new
