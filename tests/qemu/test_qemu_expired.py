"""A device shelved past its certificate's notAfter boots and recovers under systemd, in
QEMU (issue 10, item 1).

Its client.pem is replaced before the first boot by one for the same key and
Subject that expired 30 days ago (signed by the factory's device CA): the
gateway refuses it. certrotate.service's check judges it due at once and
rotates through EST within the factory's renewal window (90 days), which
records DEVICE_RENEWED_AFTER_EXPIRY; the device is back online with its new
identity."""

from __future__ import annotations

import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from pki import DAY, utcnow
from qemu_checks import gateway_accepts
from qemu_timing import stage

pytestmark = pytest.mark.timeout(900)

NAME = "dev-shelved"
DAYS_EXPIRED = 30


def expire_identity(backend, device_tree) -> None:
    cert_file = device_tree / "var/sota/client.pem"
    current = x509.load_pem_x509_certificate(cert_file.read_bytes())
    expired = backend.device_ca().issue(current.subject, current.public_key(),
                                        not_before=utcnow() - (DAYS_EXPIRED + 365) * DAY,
                                        not_after=utcnow() - DAYS_EXPIRED * DAY)
    cert_file.write_bytes(expired.public_bytes(Encoding.PEM))


def test_a_device_whose_certificate_expired_while_shelved_recovers(make_guest, module_backend, scratch):
    guest = make_guest(NAME, module_backend, lambda tree: expire_identity(module_backend, tree))
    guest.boot("first boot, a month past notAfter")
    guest.ssh("systemctl stop certrotate.timer")
    old = guest.identity(scratch / "old")
    assert not gateway_accepts(module_backend, old.key, old.cert)

    with stage(f"{NAME}: certrotate.service renews the expired certificate"):
        result = guest.run_certrotate_service()
    assert result.returncode == 0, guest.journal()
    assert "the certificate has expired" in guest.journal()
    new = guest.identity(scratch / "new")
    assert new.cert_path != old.cert_path
    cert = x509.load_pem_x509_certificate(new.cert.read_bytes())
    assert cert.not_valid_after_utc > utcnow() + 300 * DAY
    assert gateway_accepts(module_backend, new.key, new.cert)
    guest.wait_standin_ok(new.cert_path, timeout=180)
    events = [json.loads(line) for line in module_backend.cli("events").stdout.splitlines()]
    [renewed] = [e for e in events if e["type"] == "DEVICE_RENEWED_AFTER_EXPIRY"]
    assert renewed["device"] == NAME
    assert (DAYS_EXPIRED - 1) * 86400 < renewed["data"]["late-seconds"] < (DAYS_EXPIRED + 1) * 86400
    guest.shutdown()
