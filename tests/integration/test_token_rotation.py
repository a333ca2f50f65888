"""Rotations of an identity held in a real PKCS#11 token (SoftHSM2), against the real backend.

The device is registered into the token as lmp-device-register does it
(tests/softhsm.py); the agent rotates it over real mutual TLS with the token
key through OpenSSL's pkcs11-provider. What the test checks is read with
other tools: pkcs11-tool for the token's objects and its ECDH, openssl
s_client for the gateway's answer to each identity.
"""

from __future__ import annotations

import json
import tomllib

import pytest

from agentdevice import decrypt_map, event_lines, fake_systemctl, run_agent
from test_crash_points import crash_at_every_point
from backend import ROTATION_EVENTS
from certrotate import ecies
from softhsm import USER_PIN, DerivingKey, SoftHsm, gateway_get, register_token_device

pytestmark = pytest.mark.timeout(300)

DEVICE_VALUES = {"db-password": "hunter2", "api-token": "t0ken"}
LOCAL_VALUES = {"wifi": "psk"}


def p11_ids(device) -> tuple[str, str]:
    p11 = tomllib.loads((device / "var/sota/sota.toml").read_text())["p11"]
    return p11["tls_pkey_id"], p11["tls_clientcert_id"]


def token_device(backend, tmp_path, name, **kwargs):
    hsm = SoftHsm(tmp_path / f"{name}-hsm")
    device = register_token_device(backend, hsm, name, tmp_path / name, **kwargs)
    return device, hsm


def write_token_local_config(device, hsm: SoftHsm, key_id: str, values: dict) -> None:
    from cryptography.hazmat.primitives.serialization import load_der_public_key
    import base64

    public = load_der_public_key(hsm.public_key_der(key_id))
    config = {name: {"Value": base64.b64encode(ecies.encrypt(public, value.encode())).decode(),
                     "OnChanged": [], "Unencrypted": False} for name, value in values.items()}
    path = device / "var/sota/config.encrypted"
    path.write_text(json.dumps(config))
    path.chmod(0o600)


def cert_file(hsm: SoftHsm, cert_id: str):
    path = hsm.dir / f"client-{cert_id}.der"
    path.write_bytes(hsm.cert_der(cert_id))
    return path


def assert_token_rotated(backend, device, hsm: SoftHsm, old: SoftHsm, ids: tuple[str, str],
                         old_ids: tuple[str, str]) -> None:
    key_id, cert_id = ids
    assert p11_ids(device) == ids
    # Exactly one live pair and one certificate, at the ids sota.toml names.
    assert hsm.objects() == sorted([("Certificate", cert_id, "client"), ("Private Key", key_id, "tls"),
                                    ("Public Key", key_id, "tls")])
    # The gateway accepts the new identity and refuses the old one (kept in a copy of the token).
    new_cert = cert_file(hsm, cert_id)
    assert gateway_get(backend, hsm, key_id, new_cert)[0] == "HTTP/1.1 200 OK"
    refused = gateway_get(backend, old, old_ids[0], cert_file(old, old_ids[1]))[0]
    assert refused.startswith("HTTP/1.1 403"), refused
    # The device config, on the server and locally, decrypts through the token (its ECDH).
    token_key = DerivingKey(hsm, key_id)
    status, body = gateway_get(backend, hsm, key_id, new_cert, "/config-device")
    assert status == "HTTP/1.1 200 OK", status
    assert decrypt_map(json.loads(body), token_key) == DEVICE_VALUES
    local = json.loads((device / "var/sota/config.encrypted").read_text())
    assert decrypt_map(local, token_key) == LOCAL_VALUES
    state = json.loads((device / "var/sota/certrotate/state.json").read_text())
    assert state["current"] is None


def test_token_rotation_alternates_ids_and_back(backend, tmp_path):
    device, hsm = token_device(backend, tmp_path, "tok-1")
    backend.cli("devices", "config", "set", "tok-1", *(f"{k}={v}" for k, v in DEVICE_VALUES.items()))
    write_token_local_config(device, hsm, "01", LOCAL_VALUES)
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)

    first_token = hsm.snapshot(tmp_path / "tok-1-before")
    result = run_agent(device, "rotate", "--rotation-id", "certs-1", bin_dir=bin_dir, env=hsm.env)
    assert result.returncode == 0, result.stderr
    assert_token_rotated(backend, device, hsm, first_token, ("07", "09"), ("01", "03"))
    names = [line.split(" : ", 1)[1].split("(")[0] for line in event_lines(backend, "tok-1", "certs-1")]
    assert names == list(ROTATION_EVENTS)

    second_token = hsm.snapshot(tmp_path / "tok-1-between")
    again = run_agent(device, "rotate", "--rotation-id", "certs-2", bin_dir=bin_dir, env=hsm.env)
    assert again.returncode == 0, again.stderr
    assert_token_rotated(backend, device, hsm, second_token, ("01", "03"), ("07", "09"))

    # The PIN is nowhere but sota.toml: not in the output, the journal or the agent's files.
    for text in (result.stderr, result.stdout, again.stderr):
        assert USER_PIN not in text
    for path in (device / "var/sota/certrotate").rglob("*"):
        if path.is_file():
            assert USER_PIN.encode() not in path.read_bytes(), path
    status = json.loads(run_agent(device, "status", "--json", bin_dir=bin_dir, env=hsm.env).stdout)
    assert status["certificate"]["file"] == "pkcs11:token=aktualizr;id=03"


@pytest.mark.timeout(1500)
def test_every_crash_point_of_a_token_rotation_recovers(module_backend, tmp_path):
    """The crash-point suite over the token path: every token write is a point."""
    backend = module_backend

    def device(name):
        device, hsm = token_device(backend, tmp_path, name)
        backend.cli("devices", "config", "set", name, *(f"{k}={v}" for k, v in DEVICE_VALUES.items()))
        write_token_local_config(device, hsm, "01", LOCAL_VALUES)
        before = hsm.snapshot(tmp_path / f"{name}-before")
        return device, hsm.env, lambda: assert_token_rotated(backend, device, hsm, before, ("07", "09"),
                                                             ("01", "03"))

    points = crash_at_every_point(backend, tmp_path, device)
    for expected in ("est:p11-new-key", "est:new-key-journaled", "finalize:p11-cert", "finalize:sota-0",
                     "retire:p11-old-key-0", "retire:p11-old-public-key-0", "retire:p11-old-cert-0"):
        assert expected in points
