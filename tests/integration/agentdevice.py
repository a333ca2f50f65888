"""Helpers for tests that run the real agent against the real backend.

There is no systemd in the test sandbox, so a recording ``systemctl`` script
goes first on PATH (the QEMU suite runs the real one). Everything else is
real: the agent runs as a child process (console script ``certrotate``),
talks TLS to the backend on loopback, and writes a device tree in tmp_path.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import requests
from cryptography import x509

from cryptography.hazmat.primitives.serialization import load_pem_private_key

from certrotate import ecies

AGENT_TIMEOUT = 120


def agent_command() -> list[str]:
    """The agent's command line. CERTROTATE_TEST_AGENT_PYTHON=PYTHON runs it with another
    interpreter (e.g. a venv with the oldest cryptography and requests devices carry)."""
    other = os.environ.get("CERTROTATE_TEST_AGENT_PYTHON")
    if other:
        return [other, "-m", "certrotate.cli"]
    script = Path(sys.executable).parent / "certrotate"
    return [str(script)] if script.exists() else [sys.executable, "-m", "certrotate.cli"]


def fake_systemctl(directory: Path, active: tuple[str, ...] = ("aktualizr-lite.service", "fioconfig.service")) -> Path:
    """A systemctl that reports ``active`` units active and logs every call to ``directory/systemctl.log``."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "systemctl"
    log = directory / "systemctl.log"
    units = " ".join(active)
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{log}"\n'
        'case "$1" in\n'
        # As systemctl does: one state per unit asked, exit 0 when one of them is active.
        '  is-active) shift; status=3\n'
        '    for u in "$@"; do\n'
        f'      case " {units} " in *" $u "*) echo active; status=0 ;; *) echo inactive ;; esac\n'
        '    done\n'
        '    exit $status ;;\n'
        "  restart|start) exit 0 ;;\n"
        "esac\n"
        "exit 1\n"
    )
    script.chmod(0o755)
    return script


def run_agent(device_root: Path, *args: str, bin_dir: Path, env: dict | None = None,
              timeout: float = AGENT_TIMEOUT, umask: int = -1,
              command: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run the agent (``command``, default agent_command()) on ``device_root``; ``umask``
    (-1: the test's own) is the child's."""
    # INVOCATION_ID tells the agent it runs under systemd: only a test that says so sets it.
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith("CERTROTATE_") and k != "INVOCATION_ID"}
    environment["PATH"] = f"{bin_dir}:{environment.get('PATH', '/usr/bin:/bin')}"
    environment.update(env or {})
    return subprocess.run([*(command or agent_command()), "--root", str(device_root), *args],
                          capture_output=True, text=True, timeout=timeout, env=environment, umask=umask)


def stop_after_step_4(device_root: Path, rotation_id: str, *, bin_dir: Path, env: dict | None = None) -> None:
    """A rotation whose agent died after step 4, sota.toml still naming the old identity
    (what an OTA update or rollback at that moment leaves)."""
    killed = run_agent(device_root, "rotate", "--rotation-id", rotation_id, bin_dir=bin_dir,
                       env={**(env or {}), "CERTROTATE_CRASH_AT": "journal:server_config"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr


def active_identity(device_root: Path) -> tuple[Path, Path]:
    """(key, cert) files sota.toml names, under device_root."""
    sota = tomllib.loads((device_root / "var/sota/sota.toml").read_text())["import"]
    resolve = lambda p: device_root / os.path.join(sota.get("base_path", "/var/sota"), p).lstrip("/")  # noqa: E731
    return resolve(sota["tls_pkey_path"]), resolve(sota["tls_clientcert_path"])


def load_key(path: Path):
    return load_pem_private_key(path.read_bytes(), None)


def write_local_config(device_root: Path, values: dict[str, str]) -> Path:
    """A fioconfig config.encrypted holding ``values`` encrypted for the device's current key."""
    key_file, _ = active_identity(device_root)
    public = load_key(key_file).public_key()
    config = {
        name: {"Value": base64.b64encode(ecies.encrypt(public, value.encode())).decode(),
               "OnChanged": [], "Unencrypted": False}
        for name, value in values.items()
    }
    path = device_root / "var/sota/config.encrypted"
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


def decrypt_map(config: dict, key) -> dict[str, str]:
    return {
        name: entry["Value"] if entry.get("Unencrypted")
        else ecies.decrypt(key, base64.b64decode(entry["Value"])).decode()
        for name, entry in config.items()
    }


def secret_files(device_root: Path) -> list[Path]:
    """Every file under the device root that holds a private key (or a zeroed leftover of one)."""
    found = []
    for path in device_root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if b"PRIVATE KEY" in data or path.suffix == ".key" or path.name.endswith(".certrotate-tmp"):
                found.append(path)
    return found


class OldIdentity:
    """A copy of the device's first key and certificate, kept outside the device tree."""

    def __init__(self, device_root: Path, scratch: Path):
        key_file, cert_file = active_identity(device_root)
        scratch.mkdir(parents=True, exist_ok=True)
        self.device_key_file = key_file
        self.key_pem = key_file.read_bytes()
        self.key = scratch / "old-pkey.pem"
        self.cert = scratch / "old-client.pem"
        self.key.write_bytes(self.key_pem)
        self.key.chmod(0o600)
        self.cert.write_bytes(cert_file.read_bytes())


def new_device(backend, tmp_path: Path, name: str, *, device_values: dict[str, str] | None = None,
               local_values: dict[str, str] | None = None) -> tuple[Path, OldIdentity]:
    """Register ``name`` (device tree under tmp_path), give it config, keep its first identity."""
    device = backend.register(name, tmp_path / name)
    if device_values:
        backend.cli("devices", "config", "set", name, *(f"{k}={v}" for k, v in device_values.items()))
    if local_values:
        write_local_config(device, local_values)
    return device, OldIdentity(device, tmp_path / f"{name}-old")


def assert_rotated(backend, device_root: Path, old: OldIdentity, *,
                   device_values: dict[str, str], local_values: dict[str, str] | None):
    """The end state of a good rotation, checked against the real backend."""
    key_file, cert_file = active_identity(device_root)
    assert key_file != old.device_key_file, "sota.toml still names the old key"
    # Exactly one private key on the device, the one sota.toml names, 0600.
    assert secret_files(device_root) == [key_file], secret_files(device_root)
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.read_bytes() != old.key_pem
    # The gateway accepts the new identity and refuses the old one.
    assert backend.gateway(device_root, "GET", "/device", key=key_file, cert=cert_file).status_code == 200
    refused = backend.gateway(device_root, "GET", "/device", key=old.key, cert=old.cert)
    assert refused.status_code == 403, refused.text
    # The device config, on the server and locally, decrypts with the new key.
    new_key = load_key(key_file)
    reply = backend.gateway(device_root, "GET", "/config-device", key=key_file, cert=cert_file)
    if device_values:
        assert reply.status_code == 200, reply.text
        assert decrypt_map(reply.json(), new_key) == device_values
    else:
        assert reply.status_code == 204, reply.text
    if local_values is not None:
        local = json.loads((device_root / "var/sota/config.encrypted").read_text())
        assert decrypt_map(local, new_key) == local_values
    # No rotation left in progress.
    state = json.loads((device_root / "var/sota/certrotate/state.json").read_text())
    assert state["current"] is None
    return key_file, cert_file


def anchors_of(device_root: Path) -> list[str]:
    """The subject CNs of the certificates in the device's trust anchor file, in order."""
    found = x509.load_pem_x509_certificates((device_root / "var/sota/root.crt").read_bytes())
    return [c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value for c in found]


def reaches_gateway(backend, device_root: Path) -> bool:
    """Whether the device's identity gets through, the gateway verified against the device's own
    anchor file (as aktualizr-lite and fioconfig verify it)."""
    key, cert = active_identity(device_root)
    try:
        reply = requests.get(backend.gateway_url + "/device", cert=(str(cert), str(key)),
                             verify=str(device_root / "var/sota/root.crt"), timeout=30)
    except requests.exceptions.SSLError:
        return False
    return reply.status_code == 200


def restarts(bin_dir: Path) -> list[str]:
    """The restarts fake_systemctl was asked for, in order."""
    log = bin_dir / "systemctl.log"
    return [line for line in log.read_text().splitlines() if line.startswith("restart")] if log.exists() else []


def event_lines(backend, device: str, rotation_id: str) -> list[str]:
    return backend.cli("devices", "updates", device, rotation_id).stdout.splitlines()
