"""`make demo`: a local backend and a simulated device doing a real rotation.

Creates a factory in a temporary directory, starts certrotate-server on free
loopback ports, registers a device (a device root filesystem in a directory),
stores an encrypted device config file, triggers a rotation as an operator
would (`devices config rotate-certs`), runs the agent as fioconfig's handler
would, then prints fioctl's `devices updates` views, the deny-list and the
factory event queue. Stops the server and leaves nothing running.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from backend import Backend, device_identity  # noqa: E402

DEVICE = "demo-device-1"


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def show(result: subprocess.CompletedProcess) -> None:
    print(result.stdout.rstrip(), flush=True)


def agent_command() -> list[str]:
    script = Path(sys.executable).parent / "certrotate"
    return [str(script)] if script.exists() else [sys.executable, "-m", "certrotate.cli"]


def rotation_request(backend: Backend, device_root: Path) -> tuple[str, str]:
    """What fioconfig does: fetch /config and read the fio-rotate-certs file."""
    config = backend.gateway(device_root, "GET", "/config").json()
    fields = dict(line.split("=", 1) for line in config["fio-rotate-certs"]["Value"].splitlines() if "=" in line)
    return fields["ROTATIONID"], fields["ESTSERVER"]


def main() -> int:
    keep = "--keep" in sys.argv[1:]
    tmp = Path(tempfile.mkdtemp(prefix="certrotate-demo-"))
    backend = Backend(tmp / "factory")
    try:
        banner(f"factory PKI created in {backend.dir}; starting certrotate-server")
        backend.start()
        print(f"gateway {backend.gateway_url}\nEST     {backend.est_url}")

        banner(f"register {DEVICE} (device tree in {tmp / 'device'})")
        device_root = backend.register(DEVICE, tmp / "device")
        # The simulated device runs no systemd units; a real one restarts aktualizr-lite and fioconfig.
        with open(device_root / "etc/certrotate/certrotate.toml", "a") as toml:
            toml.write('\n[services]\nrestart = []\n')
        key, cert = device_identity(device_root)
        print(f"key {key.relative_to(device_root)}, certificate {cert.relative_to(device_root)}")
        # A copy of the old identity, as a thief would keep it: the gateway must refuse it afterwards.
        stolen = tmp / "old-identity"
        stolen.mkdir(mode=0o700)
        old_key, old_cert = stolen / "pkey.pem", stolen / "client.pem"
        shutil.copy2(key, old_key)
        shutil.copy2(cert, old_cert)
        show(backend.cli("devices", "config", "set", DEVICE, "wifi-password=correct horse battery staple"))

        banner("operator: certrotate-server devices config rotate-certs")
        show(backend.cli("devices", "config", "rotate-certs", DEVICE, "--reason", "demo rotation"))
        rotation_id, est_server = rotation_request(backend, device_root)

        banner(f"device: certrotate --root {device_root} rotate --est-server {est_server}")
        agent = subprocess.run(
            [*agent_command(), "--root", str(device_root), "rotate", "--est-server", est_server,
             "--rotation-id", rotation_id, "--reason", "demo rotation"],
            timeout=300,
        )
        if agent.returncode != 0:
            print(f"\nthe agent exited {agent.returncode}; server log: {backend.log_path}", file=sys.stderr)
            return 1
        new_key, new_cert = device_identity(device_root)
        print(f"now using key {new_key.relative_to(device_root)}, certificate {new_cert.relative_to(device_root)}")
        reply = backend.gateway(device_root, "GET", "/device")
        print(f"gateway with the new certificate: HTTP {reply.status_code}")
        old = backend.gateway(device_root, "GET", "/device", key=old_key, cert=old_cert)
        print(f"gateway with the old certificate: HTTP {old.status_code} ({old.text.strip()})")

        banner(f"certrotate-server devices updates {DEVICE}")
        show(backend.cli("devices", "updates", DEVICE))
        banner(f"certrotate-server devices updates {DEVICE} {rotation_id}")
        show(backend.cli("devices", "updates", DEVICE, rotation_id))
        banner("certrotate-server deny-list")
        show(backend.cli("deny-list"))
        banner("certrotate-server events")
        show(backend.cli("events"))
        return 0 if reply.status_code == 200 and old.status_code == 403 else 1
    finally:
        backend.stop()
        print(f"\nserver stopped; files in {tmp}" if keep else "\nserver stopped", flush=True)
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
