"""A power cut while the device replaces its trust anchor file, under systemd in QEMU
(issue 10, item 3).

The factory rolls its root CA over; certrotate.service's check takes the new
root in through the cross-certificate and pauses once the new anchor file is in
place but before the units that read it are restarted; the test cuts the power
there. After the boot the device is online with the file the cut left, and the
next run restarts the units and records the update. The device then rotates
onto the new device CA, the factory retires the old root, and the device drops it.
"""

from __future__ import annotations

import json

import pytest
from cryptography import x509

from qemu_checks import assert_online
from qemu_timing import stage

pytestmark = pytest.mark.timeout(1200)

NAME = "dev-anchors"
CUT_AT = "anchors:bundle"  # the new file durable, aktualizr-lite and fioconfig not yet restarted
OLD, NEW = "certrotate-factory root CA", "certrotate-factory root CA 2"


def roots(guest) -> list[str]:
    found = x509.load_pem_x509_certificates(guest.vm.read("/var/sota/root.crt").encode())
    return [c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value for c in found]


def anchor_state(guest) -> dict:
    return json.loads(guest.vm.read("/var/sota/certrotate/anchors.json"))


def test_power_cut_while_the_trust_anchors_are_replaced(make_guest, module_backend):
    guest = make_guest(NAME, module_backend)
    guest.boot("first boot")
    guest.ssh("systemctl stop certrotate.timer")  # the test starts the agent itself
    assert roots(guest) == [OLD]
    module_backend.cli("ca", "rollover")
    module_backend.restart()
    assert_online(guest)  # the gateway's chain now ends in NewWithOld, which the old root verifies

    guest.pause_agent_at(CUT_AT, timeout=300)
    guest.power_cut()
    guest.boot(f"after a cut at {CUT_AT}")
    guest.ssh("systemctl stop certrotate.timer")
    assert roots(guest) == [OLD, NEW]  # the rename was durable before the point
    assert anchor_state(guest)["pending"], "the update's end is not journaled yet"
    assert_online(guest)

    guest.set_agent_environment()
    with stage(f"{NAME}: the update finishes"):
        result = guest.run_certrotate_service()
    assert result.returncode == 0, guest.journal()
    assert "restarted the units left to restart" in guest.journal()
    assert anchor_state(guest)["pending"] is None and roots(guest) == [OLD, NEW]
    assert_online(guest)

    # Onto the new device CA, then the old root retires and leaves the device.
    rotated = guest.ssh("certrotate rotate --reason 'onto the new CA'", check=False)
    assert rotated.returncode == 0, rotated.stderr
    module_backend.cli("ca", "retire-old")
    module_backend.restart()
    since = guest.guest_time()
    dropped = guest.ssh("certrotate anchors", check=False)
    assert dropped.returncode == 0, dropped.stderr
    assert roots(guest) == [NEW]
    _, cert_path = guest.identity_paths()
    guest.wait_standin_ok(cert_path, since=since, timeout=180)
    guest.shutdown()
