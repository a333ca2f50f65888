"""`ca rollover` / `ca retire-old` (RFC 7030 4.1.3 root CA key update), over real TLS."""

from __future__ import annotations

import json
import ssl
import socket
from urllib.parse import urlsplit

import pytest
import requests
from cryptography import x509

from backend import Backend
from certrotate_server import rollover
from certrotate_server.factory import Factory
from srvhelpers import certs_from_est, load_cert, new_key, pubkey_pem, reenroll, write_cert, write_key

pytestmark = pytest.mark.timeout(120)


def cn(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value


def verifies(url: str, trusted: list[x509.Certificate]) -> bool:
    """Whether the TLS server at ``url`` verifies against ``trusted`` alone."""
    from cryptography.hazmat.primitives.serialization import Encoding

    parts = urlsplit(url)
    context = ssl.create_default_context(cadata="".join(c.public_bytes(Encoding.PEM).decode() for c in trusted))
    # TLS 1.3: the handshake ends, the server verified, before the gateway can ask for a client certificate.
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
            with context.wrap_socket(sock, server_hostname=parts.hostname):
                return True
    except ssl.SSLCertVerificationError:
        return False


def test_rollover_transition_and_retirement(backend, tmp_path):
    old_root = load_cert(backend.dir / "root.crt")
    early = backend.register("dev-early", tmp_path / "early")
    first_etag = backend.est("GET", "cacerts").headers["ETag"]

    print(backend.cli("ca", "rollover").stdout)
    backend.restart()
    new_root = load_cert(backend.dir / "root.crt")
    new_with_old = load_cert(backend.dir / "cross-new-with-old.crt")
    old_with_new = load_cert(backend.dir / "cross-old-with-new.crt")
    assert cn(new_root) == "certrotate-factory root CA 2" and new_root.subject != old_root.subject
    # NewWithOld: the new root's name and key under the old root's signature; OldWithNew the reverse.
    assert (new_with_old.subject, new_with_old.issuer) == (new_root.subject, old_root.subject)
    assert new_with_old.public_key() == new_root.public_key()
    new_with_old.verify_directly_issued_by(old_root)
    assert (old_with_new.subject, old_with_new.issuer) == (old_root.subject, new_root.subject)
    old_with_new.verify_directly_issued_by(new_root)
    for key in ("root.key", "device-ca.key", "previous-root.key", "previous-device-ca.key"):
        assert (backend.dir / key).stat().st_mode & 0o777 == 0o600
    assert json.loads((backend.dir / "factory.json").read_text())["ca"]["transition"] is True

    # /cacerts as RFC 7030 4.1.3 has it, with an ETag a device sends back.
    reply = backend.est("GET", "cacerts")
    # A PKCS#7 certificate set has no order (DER sorts a SET OF): compared as sets.
    served = certs_from_est(reply.content)
    fingerprints = {c.fingerprint(c.signature_hash_algorithm) for c in served}
    assert len(served) == 5 and fingerprints == {c.fingerprint(c.signature_hash_algorithm) for c in (
        load_cert(backend.dir / "device-ca.crt"), new_root, new_with_old, old_with_new, old_root)}
    assert reply.headers["ETag"] != first_etag
    again = backend.est("GET", "cacerts", headers={"If-None-Match": f'"x", {reply.headers["ETag"]}'})
    assert again.status_code == 304 and again.content == b""
    assert backend.est("GET", "cacerts", headers={"If-None-Match": first_etag}).status_code == 200

    # Either root verifies both servers.
    for url in (backend.gateway_url, backend.est_url):
        assert verifies(url, [old_root]) and verifies(url, [new_root])
    # The old CA's device still gets through and renews, onto the new device CA.
    assert backend.gateway(early, "GET", "/device").status_code == 200
    key = new_key()
    renewed = reenroll(backend, early, key)
    assert renewed.status_code == 200, renewed.text
    [cert] = certs_from_est(renewed.content)
    assert cn(load_cert(backend.dir / "device-ca.crt")) == "certrotate-factory device CA 2"
    assert cert.issuer == load_cert(backend.dir / "device-ca.crt").subject
    # A device registered now trusts both roots, the new one first.
    late = backend.register("dev-late", tmp_path / "late")
    assert (late / "var/sota/root.crt").read_bytes() == (backend.dir / "root.crt").read_bytes() + (
        backend.dir / "previous-root.crt").read_bytes()

    refused = backend.cli("ca", "rollover", check=False)
    assert refused.returncode == 1 and "retire-old" in refused.stderr
    refused = backend.cli("ca", "retire-old", check=False)
    assert refused.returncode == 1 and "dev-early" in refused.stderr and "dev-late" not in refused.stderr
    # Announced, its new key becomes current when the gateway first sees it: then it has moved.
    announced = backend.gateway(early, "PATCH", "/device", json={"next_pubkey": pubkey_pem(key)})
    assert announced.status_code == 200, announced.text
    key_file, cert_file = write_key(tmp_path / "k.pem", key), write_cert(tmp_path / "c.pem", cert)
    assert backend.gateway(None, "GET", "/device", key=key_file, cert=cert_file).status_code == 200
    print(backend.cli("ca", "retire-old").stdout)
    backend.restart()

    assert sorted(cn(c) for c in certs_from_est(backend.est("GET", "cacerts").content)) == [
        "certrotate-factory device CA 2", "certrotate-factory root CA 2"]
    for url in (backend.gateway_url, backend.est_url):
        assert not verifies(url, [old_root]) and verifies(url, [new_root])
    with pytest.raises(requests.exceptions.SSLError):  # the old CA's certificate fails the handshake
        backend.gateway(early, "GET", "/device")
    assert backend.gateway(None, "GET", "/device", key=key_file, cert=cert_file).status_code == 200
    retired = sorted(p.name for p in (backend.dir / "retired/1").iterdir())
    assert retired == sorted(rollover.TRANSITION_FILES)
    assert not any((backend.dir / name).exists() for name in rollover.TRANSITION_FILES)
    assert (backend.dir / "retired/1/previous-root.key").stat().st_mode & 0o777 == 0o600


@pytest.mark.bad_input("root CA rollover")
def test_rollover_of_an_imported_root_needs_its_key(tmp_path):
    made = Backend(tmp_path / "made")
    imported = Backend(tmp_path / "imported", "--root-ca-cert", str(made.dir / "root.crt"),
                       "--root-ca-key", str(made.dir / "root.key"))
    refused = imported.cli("ca", "rollover", check=False)
    assert refused.returncode == 1 and "--root-ca-key" in refused.stderr
    wrong = imported.cli("ca", "rollover", "--root-ca-key", str(made.dir / "device-ca.key"), check=False)
    assert wrong.returncode == 1 and "is not the key of the factory's root CA" in wrong.stderr
    imported.cli("ca", "rollover", "--root-ca-key", str(made.dir / "root.key"))
    assert not (imported.dir / "previous-root.key").exists()  # an imported key is not copied in


@pytest.mark.bad_input("root CA rollover")
def test_retire_without_rollover_is_refused(tmp_path):
    factory = Backend(tmp_path / "f")
    refused = factory.cli("ca", "retire-old", check=False)
    assert refused.returncode == 1 and "no root CA rollover is in progress" in refused.stderr


def test_an_interrupted_rollover_is_finished_by_running_it_again(tmp_path):
    backend = Backend(tmp_path / "f")
    factory = Factory(backend.dir)
    staging = backend.dir / rollover.ROLLOVER_STAGING
    rollover._stage_rollover(factory, staging, None)
    # Cut part way through the commit: two files in place, factory.json not yet.
    for name in ("root.crt", "gateway.crt"):
        (staging / name).replace(backend.dir / name)
    assert not Factory(backend.dir).in_transition
    backend.cli("ca", "rollover")
    done = Factory(backend.dir)
    assert done.in_transition and done.generation == 2 and not staging.exists()
    assert cn(done.root_cert()) == "certrotate-factory root CA 2"
    load_cert(backend.dir / "cross-new-with-old.crt").verify_directly_issued_by(
        load_cert(backend.dir / "previous-root.crt"))
    assert "generation 2, in transition" in backend.cli("ca", "show").stdout
