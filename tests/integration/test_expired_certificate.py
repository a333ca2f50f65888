"""A device shelved past its certificate's notAfter comes back (issue 10, item 1).

Within the factory's window (init --expired-renewal-days, 90 by default), EST
renews the expired certificate of the device's current key and records
DEVICE_RENEWED_AFTER_EXPIRY; the agent rotates through it to a working identity.
Past the window the refusal says what to do; the gateway never accepts an
expired certificate. Real backend, real TLS, the device CA's own key signs the
expired certificates (as if issued a year ago)."""

from __future__ import annotations

import base64
import datetime
import json

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from agentdevice import fake_systemctl, new_device, run_agent
from backend import device_identity
from pki import DAY, new_key, utcnow

pytestmark = [pytest.mark.timeout(180), pytest.mark.bad_input("expired certificate")]


def expire(backend, device, days_ago: int) -> x509.Certificate:
    """Replace the device's certificate with one for the same key and Subject that expired `days_ago`."""
    key_file, cert_file = device_identity(device)
    current = x509.load_pem_x509_certificate(cert_file.read_bytes())
    expired = backend.device_ca().issue(current.subject, current.public_key(),
                       not_before=utcnow() - (days_ago + 365) * DAY, not_after=utcnow() - days_ago * DAY)
    cert_file.write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    return expired


def factory_events(backend, kind: str) -> list[dict]:
    events = [json.loads(line) for line in backend.cli("events").stdout.splitlines()]
    return [e for e in events if e["type"] == kind]


def test_expired_certificate_renews_within_the_window_and_the_device_rotates(backend, tmp_path):
    device, old = new_device(backend, tmp_path, "dev-shelved")
    expired = expire(backend, device, days_ago=60)
    with pytest.raises(requests.exceptions.SSLError):  # the gateway never accepts it
        backend.gateway(device, "GET", "/device")
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)

    run = run_agent(device, "check", bin_dir=bin_dir)
    assert run.returncode == 0, run.stderr
    assert "the certificate has expired" in run.stderr
    key_file, cert_file = device_identity(device)
    new_cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    assert new_cert.not_valid_after_utc > datetime.datetime.now(datetime.timezone.utc) + 300 * DAY
    assert new_cert.subject == expired.subject and not key_file.read_bytes() == old.key_pem
    assert backend.gateway(device, "GET", "/device").status_code == 200
    [event] = factory_events(backend, "DEVICE_RENEWED_AFTER_EXPIRY")
    payload = event["data"]
    assert payload["device"] == "dev-shelved" and 59 * 86400 < payload["late-seconds"] < 61 * 86400
    assert payload["old-not-after"] == expired.not_valid_after_utc.isoformat()
    # The old key is gone from the device and refused by the gateway.
    assert not old.device_key_file.exists() or old.device_key_file.read_bytes() != old.key_pem
    refused = backend.gateway(device, "GET", "/device", key=old.key, cert=old.cert)
    assert refused.status_code == 403


def test_past_the_window_the_refusal_says_what_to_do(backend, tmp_path):
    device, old = new_device(backend, tmp_path, "dev-lost")
    expire(backend, device, days_ago=120)
    before = {p.name: p.read_bytes() for p in (device / "var/sota").iterdir() if p.is_file()}
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)
    run = run_agent(device, "check", bin_dir=bin_dir)
    assert run.returncode == 1, run.stderr
    assert "days ago), past the factory's 90-day renewal window" in run.stderr
    assert "est expired-renewal --days" in run.stderr
    after = {p.name: p.read_bytes() for p in (device / "var/sota").iterdir() if p.is_file()}
    assert after == before  # the identity is as it was: an operator can still widen the window

    # The operator widens the window; after a restart of serve the same rotation completes.
    backend.cli("est", "expired-renewal", "--days", "200")
    backend.restart()
    resumed = run_agent(device, "check", bin_dir=bin_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert backend.gateway(device, "GET", "/device").status_code == 200


def test_an_expired_certificate_renews_only_the_current_key(backend, tmp_path):
    """A spare certificate (another key) that expired renews nothing, window or not."""
    device, _ = new_device(backend, tmp_path, "dev-spare")
    key_file, cert_file = device_identity(device)
    current = x509.load_pem_x509_certificate(cert_file.read_bytes())
    spare_key = new_key()
    spare = backend.device_ca().issue(current.subject, spare_key.public_key(), not_before=utcnow() - 400 * DAY,
                     not_after=utcnow() - 10 * DAY)
    spare_files = (tmp_path / "spare.key", tmp_path / "spare.crt")
    spare_files[0].write_bytes(spare_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    spare_files[1].write_bytes(spare.public_bytes(serialization.Encoding.PEM))
    csr = x509.CertificateSigningRequestBuilder().subject_name(current.subject).sign(new_key(), hashes.SHA256())
    reply = backend.est("POST", "simplereenroll", key=spare_files[0], cert=spare_files[1],
                        data=base64.encodebytes(csr.public_bytes(serialization.Encoding.DER)),
                        headers={"Content-Type": "application/pkcs10"})
    assert reply.status_code == 403, reply.text
    assert not factory_events(backend, "DEVICE_RENEWED_AFTER_EXPIRY")
