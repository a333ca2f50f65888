"""Rotations of an identity held in a real PKCS#11 token (SoftHSM2), against the real backend.

The device is registered into the token as lmp-device-register does it
(tests/softhsm.py); the agent rotates it over real mutual TLS with the token
key through OpenSSL's pkcs11-provider. What the test checks is read with
other tools: pkcs11-tool for the token's objects and its ECDH, openssl
s_client for the gateway's answer to each identity.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import tomllib

import pytest

from agentdevice import agent_command, decrypt_map, event_lines, fake_systemctl, run_agent
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


def assert_token_rotated(backend, device, hsm: SoftHsm, old: SoftHsm, ids: tuple[str, str],
                         old_ids: tuple[str, str]) -> None:
    key_id, cert_id = ids
    assert p11_ids(device) == ids
    # Exactly one live pair and one certificate, at the ids sota.toml names.
    assert hsm.objects() == sorted([("Certificate", cert_id, "client"), ("Private Key", key_id, "tls"),
                                    ("Public Key", key_id, "tls")])
    # The gateway accepts the new identity and refuses the old one (kept in a copy of the token).
    new_cert = hsm.cert_file(cert_id)
    assert gateway_get(backend, hsm, key_id, new_cert)[0] == "HTTP/1.1 200 OK"
    refused = gateway_get(backend, old, old_ids[0], old.cert_file(old_ids[1]))[0]
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
    assert status["certificate"]["file"] == "pkcs11:token=aktualizr;id=%03;type=cert"


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


def edit_sota(device, old: str, new: str) -> None:
    path = device / "var/sota/sota.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def assert_identity_intact(backend, device, hsm: SoftHsm, objects_before) -> None:
    """Still on its first identity, which the gateway accepts; nothing lost in the token."""
    assert p11_ids(device) == ("01", "03")
    assert [o for o in hsm.objects() if o[1] in ("01", "03")] == objects_before
    assert gateway_get(backend, hsm, "01", hsm.cert_file("03"))[0] == "HTTP/1.1 200 OK"


@pytest.mark.bad_input("PKCS#11 module")
@pytest.mark.parametrize("module", ["/usr/lib/no-such-pkcs11.so", "not-a-library"])
def test_a_module_that_does_not_load_is_a_clear_error(backend, tmp_path, module):
    device, hsm = token_device(backend, tmp_path, "tok-mod")
    if module == "not-a-library":
        module = str(tmp_path / "garbage.so")
        (tmp_path / "garbage.so").write_bytes(b"\x7fELF not really")
    objects = hsm.objects()
    edit_sota(device, f'module = "{hsm.module}"', f'module = "{module}"')
    result = run_agent(device, "rotate", bin_dir=tmp_path / "bin", env=hsm.env)
    assert result.returncode == 2, result.stderr
    assert f"cannot load the PKCS#11 module {module}" in result.stderr
    assert "what to do: check p11.module in sota.toml" in result.stderr
    edit_sota(device, f'module = "{module}"', f'module = "{hsm.module}"')
    assert_identity_intact(backend, device, hsm, objects)
    assert not (device / "var/sota/certrotate/state.json").exists()  # nothing was begun


@pytest.mark.bad_input("token label")
def test_a_token_not_found_by_its_label_is_a_clear_error(backend, tmp_path):
    device, hsm = token_device(backend, tmp_path, "tok-label")
    objects = hsm.objects()
    edit_sota(device, "[p11]\n", '[p11]\nlabel = "factory-hsm"\n')
    result = run_agent(device, "rotate", bin_dir=tmp_path / "bin", env=hsm.env)
    assert result.returncode == 2, result.stderr
    assert "no token labelled 'factory-hsm'" in result.stderr and "'aktualizr'" in result.stderr
    assert "check p11.label in sota.toml" in result.stderr
    edit_sota(device, 'label = "factory-hsm"\n', "")
    assert_identity_intact(backend, device, hsm, objects)


@pytest.mark.bad_input("token PIN")
def test_a_wrong_pin_is_tried_once_then_waits_for_a_new_one(backend, tmp_path):
    device, hsm = token_device(backend, tmp_path, "tok-pin")
    objects = hsm.objects()
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)
    edit_sota(device, f'pass = "{USER_PIN}"', 'pass = "11112222"')
    first = run_agent(device, "rotate", "--rotation-id", "certs-1", bin_dir=bin_dir, env=hsm.env)
    assert first.returncode == 1, first.stderr
    assert "CKR_PIN_INCORRECT" in first.stderr and "fix p11.pass in sota.toml" in first.stderr
    again = run_agent(device, "check", bin_dir=bin_dir, env=hsm.env)
    assert again.returncode == 1, again.stderr
    assert "does not try it again, lest the token lock" in again.stderr
    assert "CKR_PIN_INCORRECT" not in again.stderr  # no second C_Login with that PIN
    for text in (first.stderr, again.stderr):
        assert "11112222" not in text
    assert_identity_intact(backend, device, hsm, objects)
    # The operator fixes the PIN: the rotation resumes and completes.
    edit_sota(device, 'pass = "11112222"', f'pass = "{USER_PIN}"')
    fixed = run_agent(device, "check", bin_dir=bin_dir, env=hsm.env)
    assert fixed.returncode == 0, fixed.stderr
    assert p11_ids(device) == ("07", "09")


@pytest.mark.bad_input("token object ids")
def test_a_target_id_holding_the_live_key_is_never_cleared(backend, tmp_path):
    device, hsm = token_device(backend, tmp_path, "tok-copy", key_copies=("07",))
    objects = hsm.objects()
    result = run_agent(device, "rotate", bin_dir=tmp_path / "bin", env=hsm.env)
    assert result.returncode == 1, result.stderr
    assert "id 07, where the new identity goes, holds the live key" in result.stderr
    assert hsm.objects() == objects  # the copy at 07 is still there
    assert_identity_intact(backend, device, hsm, [o for o in objects if o[1] in ("01", "03")])


@pytest.mark.bad_input("token without ECDH")
def test_a_token_without_ecdh_fails_at_the_config_step_and_stays_resumable(backend, tmp_path):
    device, hsm = token_device(backend, tmp_path, "tok-noecdh", derive=False)
    write_token_local_config(device, hsm, "01", LOCAL_VALUES)
    objects = hsm.objects()
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)
    result = run_agent(device, "rotate", "--rotation-id", "certs-1", bin_dir=bin_dir, env=hsm.env)
    assert result.returncode == 1, result.stderr
    assert "the token cannot do ECDH with key 01" in result.stderr
    assert "tpm2-pkcs11 needs 1.9.1 or newer" in result.stderr
    state = json.loads((device / "var/sota/certrotate/state.json").read_text())
    assert state["current"]["step"] == 3 and state["schema"] == 2
    assert_identity_intact(backend, device, hsm, [o for o in objects if o[1] in ("01", "03")])


def test_a_token_without_ecdh_rotates_a_device_without_encrypted_config(backend, tmp_path):
    device, hsm = token_device(backend, tmp_path, "tok-noecdh-plain", derive=False)
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)
    result = run_agent(device, "rotate", bin_dir=bin_dir, env=hsm.env)
    assert result.returncode == 0, result.stderr
    assert p11_ids(device) == ("07", "09")
    assert gateway_get(backend, hsm, "07", hsm.cert_file("09"))[0] == "HTTP/1.1 200 OK"


@pytest.mark.bad_input("token full")
@pytest.mark.skipif(os.geteuid() != 0, reason="a full token is made with a small tmpfs, which needs root "
                    "(mount in a private mount namespace)")
def test_a_full_token_keeps_the_identity_and_resumes_once_there_is_room(backend, tmp_path):
    """SoftHSM's objects on a full tmpfs, mounted in a private mount namespace
    (gone with the script, however it ends): the key pair cannot be stored."""
    device, hsm = token_device(backend, tmp_path, "tok-full")
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)
    full = tmp_path / "full-tokens"
    after_first, after = SoftHsm(tmp_path / "after-first"), SoftHsm(tmp_path / "after")
    full.mkdir()
    full_conf = tmp_path / "full.conf"
    full_conf.write_text(hsm.conf.read_text().replace(str(hsm.tokens), str(full)))
    agent = " ".join(shlex.quote(part) for part in [*agent_command(), "--root", str(device), "rotate",
                                                      "--rotation-id", "certs-1"])
    script = f"""
        mount -t tmpfs -o size=64k tmpfs {full}
        cp -a {hsm.tokens}/. {full}/
        dd if=/dev/zero of={full}/filler bs=1k count=128 2>/dev/null || true
        rc=0; {agent} > {tmp_path}/first.out 2>&1 || rc=$?; echo $rc > {tmp_path}/first.rc
        cp -a {full}/. {after_first.tokens}/
        cp {device}/var/sota/certrotate/state.json {device}/var/sota/sota.toml {tmp_path}/
        rm {full}/filler
        rc=0; {agent} > {tmp_path}/second.out 2>&1 || rc=$?; echo $rc > {tmp_path}/second.rc
        cp -a {full}/. {after.tokens}/
    """
    env = {**os.environ, "SOFTHSM2_CONF": str(full_conf), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env = {k: v for k, v in env.items() if not k.startswith("CERTROTATE_")}
    done = subprocess.run(["unshare", "-m", "sh", "-ec", script], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    first = (tmp_path / "first.out").read_text()
    assert (tmp_path / "first.rc").read_text().strip() == "1", first
    assert "the token could not store the new key pair at id 07" in first
    assert "the token may be full" in first
    # Meanwhile the device kept its identity: the token, sota.toml and the journal as the
    # first run left them were copied.
    assert json.loads((tmp_path / "state.json").read_text())["current"]["step"] == 1
    assert tomllib.loads((tmp_path / "sota.toml").read_text())["p11"]["tls_pkey_id"] == "01"
    assert sorted(o[1] for o in after_first.objects()) == ["01", "01", "03"]
    second = (tmp_path / "second.out").read_text()
    assert (tmp_path / "second.rc").read_text().strip() == "0", second
    assert p11_ids(device) == ("07", "09")
    assert gateway_get(backend, after, "07", after.cert_file("09"))[0] == "HTTP/1.1 200 OK"


SPY = "/usr/lib/x86_64-linux-gnu/pkcs11-spy.so"  # OpenSC's: logs every PKCS#11 call, then makes it


@pytest.mark.bad_input("token PIN")
@pytest.mark.skipif(not os.path.exists(SPY), reason=f"OpenSC's {SPY} is not installed (Debian package opensc)")
def test_a_refused_pin_reaches_the_token_once_across_runs(backend, tmp_path):
    """Counted at the token's interface (pkcs11-spy between the agent and SoftHSM2):
    neither the agent nor pkcs11-provider, loaded for event delivery, tries it again."""
    device, hsm = token_device(backend, tmp_path, "tok-spy")
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)
    edit_sota(device, f'module = "{hsm.module}"', f'module = "{SPY}"')
    edit_sota(device, f'pass = "{USER_PIN}"', 'pass = "11112222"')
    spy_log = tmp_path / "spy.log"
    env = {**hsm.env, "PKCS11SPY": hsm.module, "PKCS11SPY_OUTPUT": str(spy_log)}
    logins = []
    for command in (["rotate", "--rotation-id", "certs-1"], ["check"], ["check"]):
        run = run_agent(device, *command, bin_dir=bin_dir, env=env)
        assert run.returncode == 1, run.stderr
        logins.append(spy_log.read_text().count("C_Login") if spy_log.exists() else 0)
        spy_log.unlink(missing_ok=True)
    assert logins == [1, 0, 0]


@pytest.mark.bad_input("token identity changed by another tool")
def test_a_rotation_whose_ids_another_tool_moved_is_not_resumed(backend, tmp_path):
    """fioconfig's own rotation moved sota.toml to 07/09 while certrotate's was journaled
    from 01/03: resuming would clear id 07, which is now the live key."""
    device, hsm = token_device(backend, tmp_path, "tok-moved")
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)
    killed = run_agent(device, "rotate", "--rotation-id", "certs-1", bin_dir=bin_dir,
                       env={**hsm.env, "CERTROTATE_CRASH_AT": "journal:started"})
    assert killed.returncode == -signal.SIGKILL
    hsm.tool("--keypairgen", "--key-type", "EC:prime256v1", "--id", "07", "--label", "tls", "--usage-sign")
    theirs = hsm.public_key_der("07")
    edit_sota(device, 'tls_pkey_id = "01"', 'tls_pkey_id = "07"')
    edit_sota(device, 'tls_clientcert_id = "03"', 'tls_clientcert_id = "09"')
    resumed = run_agent(device, "check", bin_dir=bin_dir, env=hsm.env)
    assert resumed.returncode == 2, resumed.stderr
    assert "began from 01/03, but sota.toml now names 07/09" in resumed.stderr
    assert hsm.public_key_der("07") == theirs
