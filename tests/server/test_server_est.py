"""EST endpoints (RFC 7030 / RFC 8951) and every refusal, over real TLS."""

import base64
import datetime as dt

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from backend import Backend, device_identity
from srvhelpers import (
    certs_from_est, est_body, load_cert, make_csr, new_key, pubkey_pem, reenroll, renewal_csr, write_cert, write_key,
)

pytestmark = pytest.mark.timeout(120)
PKCS10 = {"Content-Type": "application/pkcs10"}


@pytest.fixture
def device(backend, tmp_path):
    return backend.register("dev-1", tmp_path / "dev-1")


def est_password(backend) -> str:
    return (backend.dir / "est-password").read_text().strip()


def enroll_csr(name: str, key) -> bytes:
    return make_csr(key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))


def test_cacerts_without_client_cert(backend):
    reply = backend.est("GET", "cacerts")
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("application/pkcs7-mime")
    assert reply.headers["Content-Transfer-Encoding"] == "base64"
    lines = reply.content.split(b"\r\n")
    assert all(len(line) <= 64 for line in lines) and len(lines) > 2 and lines[-1] == b""
    certs = certs_from_est(reply.content)
    assert {c.fingerprint(c.signature_hash_algorithm) for c in certs} == {
        load_cert(backend.dir / n).fingerprint(certs[0].signature_hash_algorithm) for n in ("device-ca.crt", "root.crt")}


def test_one_line_base64_option(tmp_path):
    backend = Backend(tmp_path / "f", "--b64-one-line")
    backend.start()
    try:
        reply = backend.est("GET", "cacerts")
        assert reply.content.count(b"\n") == 1 and len(reply.content) > 100
    finally:
        backend.stop()


def test_csrattrs(backend):
    reply = backend.est("GET", "csrattrs")
    assert reply.status_code == 200 and reply.headers["Content-Type"] == "application/csrattrs"
    # SEQUENCE { OID ecdsa-with-SHA256 }
    assert base64.b64decode(reply.content) == bytes.fromhex("300a06082a8648ce3d040302")


def test_unknown_operation_path_and_method(backend):
    assert backend.est("GET", "serverkeygen").status_code == 404
    assert backend.est("POST", "cacerts", data=b"x").status_code == 405
    assert backend.est("GET", "simplereenroll").status_code == 405


def test_simpleenroll_with_basic_credentials(backend, tmp_path):
    key = new_key()
    reply = backend.est("POST", "simpleenroll", data=est_body(enroll_csr("new-dev", key)), headers=PKCS10,
                        auth=("bootstrap", est_password(backend)))
    assert reply.status_code == 200, reply.text
    [cert] = certs_from_est(reply.content)
    assert pubkey_pem(cert.public_key()) == pubkey_pem(key)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "new-dev"
    # The device now exists and can use the gateway.
    key_path, cert_path = write_key(tmp_path / "k.pem", key), write_cert(tmp_path / "c.pem", cert)
    assert backend.gateway(None, "GET", "/device", key=key_path, cert=cert_path).json()["name"] == "new-dev"
    # Same CN with another key: refused (a device is renewed with simplereenroll).
    other = backend.est("POST", "simpleenroll", data=est_body(enroll_csr("new-dev", new_key())), headers=PKCS10,
                        auth=("bootstrap", est_password(backend)))
    assert other.status_code == 409 and "simplereenroll" in other.text


def test_simpleenroll_refuses_two_cns_and_a_san_unless_allowed(backend, tmp_path):
    auth = ("bootstrap", est_password(backend))
    two_cns = make_csr(new_key(), x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-a"),
                                              x509.NameAttribute(NameOID.COMMON_NAME, "dev-b")]))
    reply = backend.est("POST", "simpleenroll", data=est_body(two_cns), headers=PKCS10, auth=auth)
    assert reply.status_code == 400 and "2 CNs" in reply.text
    san = x509.SubjectAlternativeName([x509.DNSName("gateway.example")])
    with_san = make_csr(new_key(), x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-c")]), san)
    reply = backend.est("POST", "simpleenroll", data=est_body(with_san), headers=PKCS10, auth=auth)
    assert reply.status_code == 400 and "--allow-csr-san" in reply.text
    assert "dev-c" not in backend.cli("devices", "list").stdout

    allowing = Backend(tmp_path / "allowing", "--allow-csr-san", "--est-password", "pw")
    allowing.start()
    try:
        reply = allowing.est("POST", "simpleenroll", data=est_body(with_san), headers=PKCS10,
                             auth=("bootstrap", "pw"))
        assert reply.status_code == 200, reply.text
        [cert] = certs_from_est(reply.content)
        assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == san
    finally:
        allowing.stop()


@pytest.mark.bad_input("name with a trailing newline")
def test_simpleenroll_refuses_a_cn_with_a_trailing_newline(backend):
    reply = backend.est("POST", "simpleenroll", data=est_body(enroll_csr("new-d\n", new_key())), headers=PKCS10,
                        auth=("bootstrap", est_password(backend)))
    assert reply.status_code == 400 and "not allowed" in reply.text, reply.text
    assert "new-d" not in backend.cli("devices", "list").stdout


def test_simpleenroll_refuses_without_or_with_wrong_credentials(backend):
    body = est_body(enroll_csr("x", new_key()))
    none = backend.est("POST", "simpleenroll", data=body, headers=PKCS10)
    assert none.status_code == 401 and none.headers["WWW-Authenticate"].startswith("Basic")
    wrong = backend.est("POST", "simpleenroll", data=body, headers=PKCS10, auth=("bootstrap", "wrong"))
    assert wrong.status_code == 401


def test_simpleenroll_refuses_a_device_certificate_as_credential(backend, device):
    key, cert = device_identity(device)
    reply = backend.est("POST", "simpleenroll", key=key, cert=cert, data=est_body(enroll_csr("second", new_key())),
                        headers=PKCS10)
    assert reply.status_code == 401, reply.text
    assert "simplereenroll" in reply.text
    assert "second" not in backend.cli("devices", "list").stdout


def test_simplereenroll_issues_client_certificate(backend, device):
    old = load_cert(device_identity(device)[1])
    key = new_key()
    reply = reenroll(backend, device, key)
    assert reply.status_code == 200, reply.text
    assert reply.headers["Content-Type"].startswith("application/pkcs7-mime")
    [cert] = certs_from_est(reply.content)
    assert cert.subject.public_bytes() == old.subject.public_bytes()
    with pytest.raises(x509.ExtensionNotFound):  # none on the current one: none issued
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert pubkey_pem(cert.public_key()) == pubkey_pem(key)
    cert.verify_directly_issued_by(load_cert(backend.dir / "device-ca.crt"))
    validity = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=365) <= validity <= dt.timedelta(days=365, minutes=10)
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not (ku.key_cert_sign or ku.crl_sign or ku.key_encipherment)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert eku.critical and list(eku.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_validity_never_past_the_ca(tmp_path):
    backend = Backend(tmp_path / "f", "--validity-days", "40000")
    backend.start()
    try:
        device = backend.register("d", tmp_path / "d")
        reply = reenroll(backend, device, new_key())
        [cert] = certs_from_est(reply.content)
        assert cert.not_valid_after_utc == load_cert(backend.dir / "device-ca.crt").not_valid_after_utc
    finally:
        backend.stop()


def test_simplereenroll_requires_client_certificate(backend, device):
    csr = renewal_csr(load_cert(device_identity(device)[1]), new_key())
    reply = backend.est("POST", "simplereenroll", data=est_body(csr), headers=PKCS10)
    assert reply.status_code == 401


def test_simplereenroll_refuses_subject_mismatch(backend, device):
    other = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "certrotate-factory"),
                       x509.NameAttribute(NameOID.COMMON_NAME, "someone-else")])
    reply = reenroll(backend, device, new_key(), subject=other)
    assert reply.status_code == 400 and "Subject" in reply.text


def test_simplereenroll_refuses_subject_encoding_mismatch(backend, device):
    """Same text, different ASN.1 string type: not byte for byte, refused."""
    cert = load_cert(device_identity(device)[1])
    recoded = x509.Name([x509.NameAttribute(a.oid, a.value, x509.name._ASN1Type.UTF8String)
                         for a in cert.subject])
    assert recoded.rfc4514_string() == cert.subject.rfc4514_string()
    reply = reenroll(backend, device, new_key(), subject=recoded)
    assert reply.status_code == 400 and "byte for byte" in reply.text


def test_simplereenroll_refuses_san_mismatch(backend, device, tmp_path):
    """RFC 7030 3.3.2: the CSR's SAN equals the current certificate's, absent for absent."""
    added = reenroll(backend, device, new_key(), san=x509.SubjectAlternativeName([x509.DNSName("evil")]))
    assert added.status_code == 400 and "subjectAltName" in added.text
    with_san = backend.register("dev-san", tmp_path / "dev-san", "--san", "dev-san.example")
    missing = reenroll(backend, with_san, new_key(), san=None)
    assert missing.status_code == 400 and "subjectAltName" in missing.text
    other = reenroll(backend, with_san, new_key(), san=x509.SubjectAlternativeName([x509.DNSName("evil")]))
    assert other.status_code == 400 and "subjectAltName" in other.text
    same = reenroll(backend, with_san, new_key())
    assert same.status_code == 200, same.text
    [renewed] = certs_from_est(same.content)
    assert renewed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == \
        x509.SubjectAlternativeName([x509.DNSName("dev-san.example")])


def test_simplereenroll_refuses_bad_signature(backend, device):
    csr = bytearray(renewal_csr(load_cert(device_identity(device)[1]), new_key()))
    csr[-1] ^= 0x01
    key, cert = device_identity(device)
    reply = backend.est("POST", "simplereenroll", key=key, cert=cert, data=est_body(bytes(csr)), headers=PKCS10)
    assert reply.status_code == 400 and "signature" in reply.text


@pytest.mark.parametrize("extension, words", [
    (x509.BasicConstraints(ca=True, path_length=None), "CA certificate"),
    (x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=False,
                   encipher_only=False, decipher_only=False), "key usage"),
    (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), "extended key usages"),
])
def test_simplereenroll_refuses_other_usages(backend, device, extension, words):
    reply = reenroll(backend, device, new_key(), extensions=[(extension, True)])
    assert reply.status_code == 400 and words in reply.text


def test_request_is_bounded(backend, device):
    key, cert = device_identity(device)
    reply = backend.est("POST", "simplereenroll", key=key, cert=cert, data=b"A" * (64 * 1024 + 1), headers=PKCS10)
    assert reply.status_code == 413


def test_refuses_wrong_content_type_and_garbage(backend, device):
    key, cert = device_identity(device)
    csr = est_body(renewal_csr(load_cert(cert), new_key()))
    wrong_type = backend.est("POST", "simplereenroll", key=key, cert=cert, data=csr,
                             headers={"Content-Type": "text/plain"})
    assert wrong_type.status_code == 415
    garbage = backend.est("POST", "simplereenroll", key=key, cert=cert, data=b"not base64 !!", headers=PKCS10)
    assert garbage.status_code == 400 and "base64" in garbage.text
    not_csr = backend.est("POST", "simplereenroll", key=key, cert=cert, data=base64.b64encode(b"hello"),
                          headers=PKCS10)
    assert not_csr.status_code == 400 and "PKCS#10" in not_csr.text


def test_ca_label(tmp_path):
    backend = Backend(tmp_path / "f", "--est-label", "devices")
    backend.start()
    try:
        device = backend.register("d", tmp_path / "d", "--est-label", "devices")
        assert 'label = "devices"' in (device / "etc/certrotate/certrotate.toml").read_text()
        wrong = backend.cli("devices", "register", "e", "--out", str(tmp_path / "e"), "--est-label", "x", check=False)
        assert wrong.returncode == 2 and "not one of this factory's labels" in wrong.stderr
        key, cert = device_identity(device)
        labelled = backend.est("POST", "devices/simplereenroll", key=key, cert=cert, headers=PKCS10,
                               data=est_body(renewal_csr(load_cert(cert), new_key())))
        assert labelled.status_code == 200
        assert backend.est("GET", "devices/cacerts").status_code == 200
        unknown = backend.est("GET", "nope/cacerts")
        assert unknown.status_code == 404 and "label" in unknown.text
    finally:
        backend.stop()


def test_manual_approval(tmp_path):
    backend = Backend(tmp_path / "f", "--manual-approval", "--retry-after", "7")
    backend.start()
    try:
        device = backend.register("d", tmp_path / "d")
        key = new_key()
        first = reenroll(backend, device, key)
        assert first.status_code == 202 and first.headers["Retry-After"] == "7"
        assert reenroll(backend, device, key).status_code == 202
        pending = backend.cli("est", "requests").stdout
        assert "pending" in pending and "CN=d" in pending
        request_id = pending.splitlines()[2].split()[0]
        backend.cli("est", "approve", request_id)
        done = reenroll(backend, device, key)
        assert done.status_code == 200
        assert pubkey_pem(certs_from_est(done.content)[0].public_key()) == pubkey_pem(key)
        # Approval is spent: a new request waits again.
        assert reenroll(backend, device, key).status_code == 202
    finally:
        backend.stop()


def test_unknown_device_and_foreign_ca(backend, tmp_path):
    """A cert from the device CA for an unregistered name; a cert from another CA."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from certrotate_server import pki

    ca_cert = load_cert(backend.dir / "device-ca.crt")
    ca_key = load_pem_private_key((backend.dir / "device-ca.key").read_bytes(), None)
    key = new_key()
    ghost = pki.issue_device_cert(pki.device_subject("ghost", "certrotate-factory"), None,
                                  key.public_key(), ca_cert, ca_key, 30)
    kp, cp = write_key(tmp_path / "g.key", key), write_cert(tmp_path / "g.crt", ghost)
    reply = backend.est("POST", "simplereenroll", key=kp, cert=cp, headers=PKCS10,
                        data=est_body(renewal_csr(ghost, new_key())))
    assert reply.status_code == 403 and "unknown device" in reply.text

    other = Backend(tmp_path / "other")
    other_key = new_key()
    foreign = pki.issue_device_cert(pki.device_subject("x", "f"), None, other_key.public_key(),
                                    load_cert(other.dir / "device-ca.crt"),
                                    load_pem_private_key((other.dir / "device-ca.key").read_bytes(), None), 30)
    import requests
    with pytest.raises(requests.exceptions.SSLError):
        backend.est("POST", "simplereenroll", key=write_key(tmp_path / "f.key", other_key),
                    cert=write_cert(tmp_path / "f.crt", foreign), headers=PKCS10,
                    data=est_body(renewal_csr(foreign, new_key())))


def test_huge_declared_body_refused_without_reading(backend):
    """Content-Length far past the limit: 413 at once, the body is never read into memory."""
    import socket
    import ssl
    from urllib.parse import urlsplit

    url = urlsplit(backend.est_url)
    ctx = ssl.create_default_context(cafile=str(backend.root_ca))
    auth = base64.b64encode(f"bootstrap:{est_password(backend)}".encode()).decode()
    with socket.create_connection((url.hostname, url.port), timeout=20) as raw:
        with ctx.wrap_socket(raw, server_hostname=url.hostname) as tls:
            tls.sendall(f"POST {url.path}/simpleenroll HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\n"
                        f"Content-Type: application/pkcs10\r\nContent-Length: 1000000000\r\n\r\n".encode())
            reply = b""
            while chunk := tls.recv(4096):  # the server closes after the reply
                reply += chunk
    reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413 ") and "exceeds the limit" in reply


@pytest.mark.bad_input("spare certificate outliving a rotation")
def test_a_spare_certificate_minted_before_a_rotation_dies_with_it(backend, device, tmp_path):
    """Whoever holds the old key mints a certificate for a key of their own before the
    rotation; once the rotation is done, that certificate must renew nothing."""
    spare_key = new_key()
    reply = reenroll(backend, device, spare_key)
    assert reply.status_code == 200, reply.text
    spare = (write_key(tmp_path / "spare.key", spare_key), write_cert(tmp_path / "spare.crt", *certs_from_est(reply.content)))
    # Not announced: EST renews only the current key or the announced next one.
    assert reenroll(backend, device, new_key(), *spare).status_code == 403

    # The device rotates to its own new key: announced, then used at the gateway.
    rotated_key = new_key()
    reply = reenroll(backend, device, rotated_key)
    rotated = (write_key(tmp_path / "new.key", rotated_key), write_cert(tmp_path / "new.crt", *certs_from_est(reply.content)))
    announce = backend.gateway(device, "PATCH", "/device", json={"next_pubkey": pubkey_pem(rotated_key)})
    assert announce.status_code == 200, announce.text
    assert backend.gateway(device, "GET", "/device", *rotated).status_code == 200

    renewal = reenroll(backend, device, new_key(), *spare)
    assert renewal.status_code == 403, renewal.text
    assert "deny-listed" in renewal.text
    assert backend.gateway(device, "GET", "/device", *spare).status_code == 403
    denied = backend.cli("deny-list").stdout
    assert format(load_cert(spare[1]).serial_number, "x") in denied
