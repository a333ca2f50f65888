"""Gateway over mutual TLS: identity, key change proof, deny-list, config lock, events."""

import base64
import json
import uuid

import pytest
import requests
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from backend import device_identity
from certrotate import ecies
from certrotate_server import pki
from srvhelpers import certs_from_est, load_cert, new_key, pubkey_pem, reenroll, write_cert, write_key

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def device(backend, tmp_path):
    return backend.register("dev-1", tmp_path / "dev-1", "--group", "lab")


def new_identity(backend, device, tmp_path, name="new"):
    """A new key and its EST-issued certificate (the rotation's step 1), as files."""
    key = new_key()
    reply = reenroll(backend, device, key)
    assert reply.status_code == 200, reply.text
    [cert] = certs_from_est(reply.content)
    return key, write_key(tmp_path / f"{name}.key", key), write_cert(tmp_path / f"{name}.crt", cert)


def factory_events(backend):
    return [json.loads(line) for line in backend.cli("events").stdout.splitlines()]


def test_get_device(backend, device):
    reply = backend.gateway(device, "GET", "/device")
    assert reply.status_code == 200
    info = reply.json()
    assert info["name"] == "dev-1" and info["group"] == "lab" and info["next_pubkey"] is None
    assert info["pubkey"] == pubkey_pem(load_cert(device_identity(device)[1]).public_key())


def test_no_client_cert_or_foreign_cert_fails_handshake(backend, device, tmp_path):
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(backend.gateway_url + "/device", verify=str(backend.root_ca), timeout=10)
    key = new_key()
    self_signed_ca = pki.make_root_ca("intruder", key)
    with pytest.raises(requests.exceptions.SSLError):
        backend.gateway(None, "GET", "/device", key=write_key(tmp_path / "k", key),
                        cert=write_cert(tmp_path / "c", self_signed_ca))


def test_unknown_device_refused(backend, tmp_path):
    ca_key = load_pem_private_key((backend.dir / "device-ca.key").read_bytes(), None)
    key = new_key()
    cert = pki.issue_device_cert(pki.device_subject("ghost", "certrotate-factory"), None, key.public_key(),
                                 load_cert(backend.dir / "device-ca.crt"), ca_key, 30)
    reply = backend.gateway(None, "GET", "/device", key=write_key(tmp_path / "k", key),
                            cert=write_cert(tmp_path / "c", cert))
    assert reply.status_code == 403 and "unknown device" in reply.text


def test_unannounced_key_refused(backend, device, tmp_path):
    _, key_path, cert_path = new_identity(backend, device, tmp_path)
    reply = backend.gateway(device, "GET", "/device", key=key_path, cert=cert_path)
    assert reply.status_code == 403 and "announce" in reply.text
    # The refusal changed nothing: the old certificate still works.
    assert backend.gateway(device, "GET", "/device").status_code == 200


def test_key_change_proof_promotes_and_deny_lists(backend, device, tmp_path):
    key, key_path, cert_path = new_identity(backend, device, tmp_path)
    announced = backend.gateway(device, "PATCH", "/device", json={"next_pubkey": pubkey_pem(key)})
    assert announced.status_code == 200 and announced.json()["next_pubkey"] == pubkey_pem(key)
    # Announcing is not using: the old cert keeps working until the new one connects.
    assert backend.gateway(device, "GET", "/device").json()["config-locked"] is True

    first = backend.gateway(device, "GET", "/device", key=key_path, cert=cert_path)
    assert first.status_code == 200
    assert first.json()["pubkey"] == pubkey_pem(key) and first.json()["next_pubkey"] is None

    old = backend.gateway(device, "GET", "/device")
    assert old.status_code == 403 and "deny-listed" in old.text
    # The old certificate cannot renew either.
    assert reenroll(backend, device, new_key()).status_code == 403

    deny = backend.cli("deny-list").stdout
    old_serial = format(load_cert(device_identity(device)[1]).serial_number, "x")
    assert "dev-1" in deny and old_serial in deny
    [event] = factory_events(backend)
    assert event["type"] == "DEVICE_PUBKEY_CHANGE" and event["device"] == "dev-1"
    assert event["data"]["new-pubkey"] == pubkey_pem(key) and old_serial in event["data"]["deny-listed-serials"]
    # Further requests with the new certificate: no second event.
    assert backend.gateway(device, "GET", "/config", key=key_path, cert=cert_path).status_code == 200
    assert len(factory_events(backend)) == 1


def test_patch_device_validates(backend, device):
    assert backend.gateway(device, "PATCH", "/device", json={"next_pubkey": "nope"}).status_code == 400
    assert backend.gateway(device, "PATCH", "/device", json={"other": 1}).status_code == 400
    assert backend.gateway(device, "PATCH", "/device", data=b"{not json",
                           headers={"Content-Type": "application/json"}).status_code == 400
    current = pubkey_pem(load_cert(device_identity(device)[1]).public_key())
    assert backend.gateway(device, "PATCH", "/device", json={"next_pubkey": current}).status_code == 400


def test_config_merge_and_device_config(backend, device):
    assert backend.gateway(device, "GET", "/config-device").status_code == 204
    backend.cli("config", "set", "a=factory", "b=factory", "c=factory")
    backend.cli("config", "set", "--group", "lab", "b=group", "c=group", "--on-changed", "/bin/true")
    backend.cli("config", "set", "--group", "other", "a=other-group")
    backend.cli("devices", "config", "set", "dev-1", "c=device", "--unencrypted")
    config = backend.gateway(device, "GET", "/config").json()
    assert config == {
        "a": {"Value": "factory", "OnChanged": [], "Unencrypted": True},
        "b": {"Value": "group", "OnChanged": ["/bin/true"], "Unencrypted": True},
        "c": {"Value": "device", "OnChanged": [], "Unencrypted": True},
    }
    assert backend.gateway(device, "GET", "/config-device").json() == {
        "c": {"Value": "device", "OnChanged": [], "Unencrypted": True}}


def test_config_set_encrypts_to_device_key(backend, device):
    backend.cli("devices", "config", "set", "dev-1", "secret=s3cr3t value")
    entry = backend.gateway(device, "GET", "/config-device").json()["secret"]
    assert entry["Unencrypted"] is False and "s3cr3t" not in entry["Value"]
    key = load_pem_private_key(device_identity(device)[0].read_bytes(), None)
    assert ecies.decrypt(key, base64.b64decode(entry["Value"])) == b"s3cr3t value"


def test_config_locked_during_rotation(backend, device, tmp_path):
    backend.cli("devices", "config", "set", "dev-1", "secret=v1")
    key, key_path, cert_path = new_identity(backend, device, tmp_path)
    backend.gateway(device, "PATCH", "/device", json={"next_pubkey": pubkey_pem(key)})
    files = [{"name": "secret", "value": base64.b64encode(ecies.encrypt(key.public_key(), b"v1")).decode(),
              "unencrypted": False, "on-changed": []}]
    plain = backend.gateway(device, "PATCH", "/config", json={"reason": "x", "files": files})
    assert plain.status_code == 409 and "locked" in plain.text
    other_key = backend.gateway(device, "PATCH", "/config",
                                json={"reason": "x", "files": files, "public-key": pubkey_pem(new_key())})
    assert other_key.status_code == 409
    operator = backend.cli("devices", "config", "set", "dev-1", "secret=v2", check=False)
    assert operator.returncode == 1 and "rotating" in operator.stderr
    rotation = backend.gateway(device, "PATCH", "/config",
                               json={"reason": "Rotating device client certificate", "files": files,
                                     "public-key": pubkey_pem(key)})
    assert rotation.status_code == 200
    value = backend.gateway(device, "GET", "/config-device").json()["secret"]["Value"]
    assert ecies.decrypt(key, base64.b64decode(value)) == b"v1"
    # The new certificate's first use unlocks.
    backend.gateway(device, "GET", "/device", key=key_path, cert=cert_path)
    backend.cli("devices", "config", "set", "dev-1", "secret=v2")


def test_patch_config_validates(backend, device):
    for body in ({"files": []}, {"files": [{"name": "../x", "value": "v"}]},
                 {"files": [{"name": "x", "value": 3}]}, {"files": [{"name": "x", "value": "v", "on-changed": "sh"}]},
                 [], {"files": [{"name": "x", "value": "v"}], "public-key": "junk"}):
        assert backend.gateway(device, "PATCH", "/config", json=body).status_code == 400, body


def test_gateway_body_bounded(backend, device):
    reply = backend.gateway(device, "PATCH", "/config", data=b"x" * (1024 * 1024 + 1),
                            headers={"Content-Type": "application/json"})
    assert reply.status_code == 413


def test_events_and_updates_view(backend, device):
    rotation = "certs-1700000000"
    names = ["CertRotationStarted", "Generate new certificate", "CertRotationCompleted"]
    events = [{"id": str(uuid.uuid4()), "deviceTime": f"2026-01-01T00:00:0{i}Z",
               "eventType": {"id": name, "version": 0},
               "event": {"correlationId": rotation, "success": i != 1, "targetName": "lmp-42", "version": "42",
                         **({"details": "EST said no\nsecond line"} if i == 1 else {})}}
              for i, name in enumerate(names)]
    assert backend.gateway(device, "POST", "/events", json=events).status_code == 200
    # A retried post (same ids) is stored once.
    assert backend.gateway(device, "POST", "/events", json=events[:1]).status_code == 200
    listing = backend.cli("devices", "updates", "dev-1").stdout.splitlines()
    assert listing[0].split() == ["ID", "TIME", "VERSION", "TARGET"]
    assert listing[2].split() == [rotation, "2026-01-01T00:00:00Z", "42", "lmp-42"]
    shown = backend.cli("devices", "updates", "dev-1", rotation).stdout.splitlines()
    assert shown == [
        "2026-01-01T00:00:00Z : CertRotationStarted(lmp-42) -> Succeed",
        "2026-01-01T00:00:01Z : Generate new certificate(lmp-42) -> Failed!",
        " Details:",
        " | EST said no",
        " | second line",
        "2026-01-01T00:00:02Z : CertRotationCompleted(lmp-42) -> Succeed",
    ]
    missing = backend.cli("devices", "updates", "dev-1", "certs-1", check=False)
    assert missing.returncode == 1 and "no update" in missing.stderr


def test_events_validated(backend, device):
    for body in ({"id": "x"}, [{"eventType": {"id": "a"}, "event": {}}], [{"id": "x", "event": {}}],
                 [{"id": "x", "eventType": {"id": "a"}, "event": {"success": "yes"}}]):
        assert backend.gateway(device, "POST", "/events", json=body).status_code == 400, body


def test_unknown_endpoint(backend, device):
    assert backend.gateway(device, "GET", "/nothing").status_code == 404


def test_one_log_line_per_request(backend, device):
    backend.gateway(device, "GET", "/device")
    backend.gateway(device, "GET", "/nothing")
    lines = [line for line in backend.log.splitlines() if " dev-1 GET /" in line]
    assert len(lines) == 2 and " 200 " in lines[0] and " 404 " in lines[1]


AGENT_REPLY_LIMIT = 1 << 20  # certrotate.http's default max_body: what the agent reads of /config-device


@pytest.mark.bad_input("per-device quota")
def test_config_uploads_are_bounded_per_device(backend, device):
    """60 uploads of ~1 MB once grew the database by 62 MiB and made the device's
    own config too large for its agent to read back (its rotation failed at step 4)."""
    db = backend.dir / "certrotate.db"
    before = db.stat().st_size
    refused = []
    for i in range(12):
        reply = backend.gateway(device, "PATCH", "/config", json={
            "reason": "flood", "files": [{"name": f"blob-{i}", "value": "A" * 900_000}]})
        refused.append(reply.status_code)
        if reply.status_code == 413:
            assert "quota" in reply.text, reply.text
    assert set(refused) == {413}, refused  # each one alone is over the per-device size quota
    small = [backend.gateway(device, "PATCH", "/config", json={
        "files": [{"name": f"part-{i}", "value": "B" * 60_000}]}).status_code for i in range(12)]
    assert small[:4] == [200] * 4 and small[-1] == 413, small
    files = [{"name": f"tiny-{i}", "value": "c"} for i in range(200)]
    many = backend.gateway(device, "PATCH", "/config", json={"files": files})
    assert many.status_code == 413 and "files" in many.text, many.text
    own = backend.gateway(device, "GET", "/config-device")
    assert own.status_code == 200 and len(own.content) < AGENT_REPLY_LIMIT // 2
    assert backend.gateway(device, "GET", "/config").status_code == 200
    assert db.stat().st_size - before < 8 * 1024 * 1024


@pytest.mark.bad_input("per-device quota")
def test_stored_events_are_bounded_per_device(backend, device):
    def batch(start, count, details=""):
        return [{"id": f"ev-{n}", "eventType": {"id": "EcuDownloadStarted", "version": 0},
                 "event": {"correlationId": f"u-{n}", "details": details}} for n in range(start, start + count)]

    too_many = backend.gateway(device, "POST", "/events", json=batch(0, 1001))
    assert too_many.status_code == 413 and "events" in too_many.text, too_many.text
    huge = backend.gateway(device, "POST", "/events", json=batch(0, 1, "x" * 20_000))
    assert huge.status_code == 413, huge.text
    for start in range(0, 3000, 500):
        assert backend.gateway(device, "POST", "/events", json=batch(start, 500)).status_code == 200
    listing = backend.cli("devices", "updates", "dev-1").stdout.splitlines()[2:]  # after the header lines
    # The newest are kept, the oldest dropped: at most the quota per device.
    assert 0 < len(listing) <= 1000
    assert any("u-2999" in line for line in listing) and not any(" u-0 " in f" {line} " for line in listing)


@pytest.mark.bad_input("per-device quota")
def test_a_scope_over_quota_can_still_be_rewritten_but_not_grown(backend, device, tmp_path):
    """A device config stored over the quota (before quotas existed) must not lock its
    rotation: the rotation's re-encrypted upload rewrites it at the same size."""
    import sqlite3
    with sqlite3.connect(backend.dir / "certrotate.db") as db:
        db.executemany("INSERT INTO config_files VALUES ('device', 'dev-1', ?, ?, 1, '[]', 'old', '2026-01-01')",
                       [(f"legacy-{i}", "L" * 100_000) for i in range(4)])
    same = backend.gateway(device, "PATCH", "/config", json={
        "files": [{"name": "legacy-0", "value": "M" * 100_000, "unencrypted": True}]})
    assert same.status_code == 200, same.text
    grown = backend.gateway(device, "PATCH", "/config", json={
        "files": [{"name": "legacy-1", "value": "M" * 100_001, "unencrypted": True}]})
    assert grown.status_code == 413 and "quota" in grown.text
