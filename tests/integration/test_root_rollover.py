"""The factory's root CA key update (RFC 7030 4.1.3), end to end (issue 10, item 3).

One factory, several devices, every stage of the transition: devices that
rotate before the rollover, during it, one registered during it, one powered
off throughout that comes back after a forced retirement. At each stage every
device reaches the gateway with the trust anchor file it holds (what
aktualizr-lite and fioconfig verify against). Real backend, real TLS, the
agent as a child process, a systemctl that logs what it is asked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key

from agentdevice import anchors_of, fake_systemctl, new_device, reaches_gateway, restarts, run_agent
from backend import device_identity
from pki import DAY, Authority, key_pem, new_key

pytestmark = pytest.mark.timeout(300)


def issuer_of(device: Path) -> str:
    cert = x509.load_pem_x509_certificate(device_identity(device)[1].read_bytes())
    return cert.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value


def cacerts_statuses(backend) -> list[int]:
    """The statuses of the /cacerts requests, from the server's log (one line per request)."""
    return [int(m) for m in re.findall(r" GET /\.well-known/est/cacerts (\d{3}) ", backend.log)]


def anchors_state(device: Path) -> dict:
    return json.loads((device / "var/sota/certrotate/anchors.json").read_text())


def agent(device, *args, bin_dir, expect=0):
    run = run_agent(device, *args, bin_dir=bin_dir)
    assert run.returncode == expect, run.stderr
    return run


def test_a_fleet_through_a_root_ca_rollover(backend, tmp_path):
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)
    early, _ = new_device(backend, tmp_path, "dev-early")  # rotates before, and again during
    during, _ = new_device(backend, tmp_path, "dev-during")  # first rotates during
    shelved, _ = new_device(backend, tmp_path, "dev-shelved")  # off throughout
    first_root = anchors_of(early)
    assert first_root == ["certrotate-factory root CA"]

    # Before: a rotation, and a check of /cacerts that finds nothing new.
    agent(early, "rotate", bin_dir=bin_dir)
    before = len(restarts(bin_dir))
    run = agent(early, "anchors", bin_dir=bin_dir)
    assert "trust anchors: unchanged" in run.stderr and len(restarts(bin_dir)) == before
    assert anchors_state(early)["etag"]

    backend.cli("ca", "rollover")
    backend.restart()
    shelved_files = {p: p.read_bytes() for p in (shelved / "var/sota").rglob("*") if p.is_file()}
    # During: old-root devices still reach the gateway (its chain carries NewWithOld).
    assert all(reaches_gateway(backend, d) for d in (early, during, shelved))
    late, _ = new_device(backend, tmp_path, "dev-registered-during")
    assert anchors_of(late) == ["certrotate-factory root CA 2", "certrotate-factory root CA"]
    assert issuer_of(late) == "certrotate-factory device CA 2" and reaches_gateway(backend, late)

    # The timer's daily check takes the new root in through the cross-certificate.
    before = len(restarts(bin_dir))
    run = agent(during, "check", bin_dir=bin_dir)
    assert "added 'OU=certrotate-factory,CN=certrotate-factory root CA 2'" in run.stderr, run.stderr
    assert anchors_of(during) == first_root + ["certrotate-factory root CA 2"]
    assert len(restarts(bin_dir)) == before + 1  # aktualizr-lite and fioconfig reload the file
    assert anchors_state(during)["pending"] is None
    # The same day's next check asks nothing; one asked for is answered 304 (not modified).
    asked = len(cacerts_statuses(backend))
    assert agent(during, "check", bin_dir=bin_dir).stderr == ""
    assert len(cacerts_statuses(backend)) == asked
    assert "trust anchors: unchanged" in agent(during, "anchors", bin_dir=bin_dir).stderr
    assert cacerts_statuses(backend)[asked:] == [304]
    assert len(restarts(bin_dir)) == before + 1

    # A rotation during the transition lands on the new device CA, whatever the anchors hold.
    agent(during, "rotate", bin_dir=bin_dir)
    assert issuer_of(during) == "certrotate-factory device CA 2" and reaches_gateway(backend, during)
    assert anchors_of(early) == first_root  # checked today already: not asked again until tomorrow
    run = agent(early, "rotate", bin_dir=bin_dir)
    assert issuer_of(early) == "certrotate-factory device CA 2" and reaches_gateway(backend, early)
    # ... but a completed rotation asks at once: its new CA's root may be all the servers keep.
    assert "added 'OU=certrotate-factory,CN=certrotate-factory root CA 2'" in run.stderr, run.stderr
    assert anchors_of(early) == first_root + ["certrotate-factory root CA 2"]

    # Retirement is refused while a device still holds only the old CA's certificate.
    refused = backend.cli("ca", "retire-old", check=False)
    assert refused.returncode == 1 and "dev-shelved" in refused.stderr, refused.stderr
    assert "dev-early" not in refused.stderr and "dev-during" not in refused.stderr
    backend.cli("ca", "retire-old", "--force")
    backend.restart()

    # After: devices with both roots still get through; their next check retires the old root.
    assert all(reaches_gateway(backend, d) for d in (early, during, late))
    for device in (early, during, late):
        day_later(device)
        run = agent(device, "check", bin_dir=bin_dir)
        assert "removed 'OU=certrotate-factory,CN=certrotate-factory root CA' (retired)" in run.stderr, run.stderr
        assert anchors_of(device) == ["certrotate-factory root CA 2"] and reaches_gateway(backend, device)

    # The shelved device: neither the servers' chains nor its certificate's CA are trusted
    # any longer. It needs registering again; its identity and files stay as they were.
    assert not reaches_gateway(backend, shelved)
    run = agent(shelved, "check", bin_dir=bin_dir, expect=1)
    assert "must be registered again" in run.stderr, run.stderr
    run = agent(shelved, "rotate", bin_dir=bin_dir, expect=1)
    assert "certificate verify failed" in run.stderr, run.stderr
    for path, data in shelved_files.items():
        if "certrotate" not in path.parts:  # the agent's own state dir records its attempts
            assert path.read_bytes() == data, path


def day_later(device: Path) -> None:
    """As if the last /cacerts check was a day ago (the check is at most daily)."""
    state_file = device / "var/sota/certrotate/anchors.json"
    if not state_file.exists():
        return  # never checked: due anyway
    state = json.loads(state_file.read_text())
    state["checked_at"] -= DAY.total_seconds()
    state_file.write_text(json.dumps(state))


@pytest.mark.bad_input("trust anchor update")
def test_a_forged_new_root_on_cacerts_is_refused(backend, tmp_path):
    """/cacerts serves a "NewWithOld" that a key other than the old root's signed (a
    hostile or broken EST server): the device keeps its anchors and says why."""
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)
    device, _ = new_device(backend, tmp_path, "dev-forged")
    backend.cli("ca", "rollover")
    genuine = backend.dir / "cross-new-with-old.crt"
    cross = x509.load_pem_x509_certificate(genuine.read_bytes())
    new_root = load_pem_private_key((backend.dir / "root.key").read_bytes(), None)
    forger = Authority(new_key(), x509.load_pem_x509_certificate((backend.dir / "previous-root.crt").read_bytes()))
    forged = forger.issue(cross.subject, new_root.public_key(), ca=True, not_after=cross.not_valid_after_utc - DAY)
    genuine.write_bytes(forged.public_bytes(Encoding.PEM))
    backend.restart()
    before = (device / "var/sota/root.crt").read_bytes()
    run = agent(device, "anchors", bin_dir=bin_dir, expect=1)
    assert "no cross-certificate signed by a trusted root vouches for it" in run.stderr, run.stderr
    assert (device / "var/sota/root.crt").read_bytes() == before and restarts(bin_dir) == []
    assert reaches_gateway(backend, device)


@pytest.mark.bad_input("trust anchor update")
def test_a_root_is_not_dropped_while_a_server_still_needs_it(backend, tmp_path):
    """/cacerts no longer serves the old root, but the gateway still presents a chain that
    needs it (an operator put back the old gateway certificate): the device keeps the old
    root, says why, and reaches the gateway."""
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)
    backend.cli("ca", "rollover")
    backend.restart()
    device, _ = new_device(backend, tmp_path, "dev-cautious")  # both roots, a device CA 2 certificate
    backend.cli("ca", "retire-old")
    retired = backend.dir / "retired/1"
    old_root = Authority(load_pem_private_key((retired / "previous-root.key").read_bytes(), None),
                         x509.load_pem_x509_certificate((retired / "previous-root.crt").read_bytes()))
    key = new_key()
    leaf = old_root.issue(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "old gateway")]),
                          key.public_key(), server_names=["127.0.0.1", "localhost"])
    (backend.dir / "gateway.crt").write_bytes(leaf.public_bytes(Encoding.PEM))
    (backend.dir / "gateway.key").write_bytes(key_pem(key))
    backend.restart()
    before = (device / "var/sota/root.crt").read_bytes()
    run = agent(device, "anchors", bin_dir=bin_dir, expect=1)
    assert "does not yet verify without the root CA /cacerts no longer serves" in run.stderr, run.stderr
    assert (device / "var/sota/root.crt").read_bytes() == before and restarts(bin_dir) == []
    assert reaches_gateway(backend, device)
