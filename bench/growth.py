"""How cost grows: rotation time against the number of encrypted config
values, and backend throughput against the number of registered devices."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from cryptography import x509

from rotation import clear_restart_units, repeated_rotations


def write_local_config(device_root: Path, values: int) -> None:
    """The device's fioconfig config.encrypted with ``values`` entries, each
    encrypted (go-ecies) to the device's current public key."""
    from certrotate import ecies

    sota = device_root / "var/sota"
    public_key = x509.load_pem_x509_certificate((sota / "client.pem").read_bytes()).public_key()
    config = {
        f"local-{i}": {
            "Value": base64.b64encode(ecies.encrypt(public_key, f"local secret {i}".encode())).decode(),
            "OnChanged": [],
            "Unencrypted": False,
        }
        for i in range(values)
    }
    fd = os.open(sota / "config.encrypted", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f)


def rotation_with_config_values(backend, work: Path, values: int, repeats: int, clock) -> dict:
    """Rotate a device that has ``values`` encrypted values in its local
    config.encrypted and as many in its device config on the server (set
    with `certrotate-server devices config set`): steps 3 and 4 re-encrypt
    them all."""
    name = f"bench-config-{values}"
    device = backend.register(name, work / name)
    clear_restart_units(device)
    write_local_config(device, values)
    backend.cli("devices", "config", "set", name, *(f"server-{i}=server secret {i}" for i in range(values)),
                timeout=600)
    summary, steps = repeated_rotations(device, repeats, clock)
    return {
        "values": values,
        "runs": summary["runs"],
        "wall_s": summary["wall_s"],
        "cpu_s": summary["cpu_s"],
        "local_config_s": steps.get("local_config", 0.0),
        "server_config_s": steps.get("server_config", 0.0),
        "steps_s": steps,
    }


def registered_row(registered: int, registration_s: float | None, levels: dict, concurrency: int) -> dict:
    """One row of throughput against registered devices, at ``concurrency``."""
    def at(endpoint: str) -> dict:
        return next(lv for lv in levels[endpoint] if lv["concurrency"] == concurrency)

    return {
        "registered": registered,
        "registration_s": registration_s,
        "concurrency": concurrency,
        "est": at("est_simplereenroll"),
        "gateway": at("gateway_get_device"),
    }
