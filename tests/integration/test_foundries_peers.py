"""Against FoundriesFactory's own software, modelled as its source behaves (tests/ffpeers.py):
fioconfig renewing a device the reference backend registered, and the agent rotating
through an EST server that behaves as foundriesio/estserver does, on a device laid out
as lmp-device-register lays it out (client.pem holds the leaf alone)."""

from __future__ import annotations

import base64

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_pem_private_key, pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from agentdevice import active_identity, assert_rotated, fake_systemctl, new_device, run_agent
from backend import device_identity
from estfaults import FaultyEst
from ffpeers import EstServerModel, fioconfig_accepts, fioconfig_b64_csr
from pki import Authority, new_key, write_file

pytestmark = pytest.mark.timeout(180)


def load_cert(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def authority(backend, name: str) -> Authority:
    return Authority(load_pem_private_key((backend.dir / f"{name}.key").read_bytes(), None),
                     load_cert(backend.dir / f"{name}.crt"))


def assert_foundries_shape(cert: x509.Certificate, device: str, factory: str, device_ca: x509.Certificate):
    """FoundriesFactory's device certificate: Subject CN=<device>, OU=<factory> in
    lmp-device-register's order and nothing else; keyUsage digitalSignature and extendedKeyUsage clientAuth, both
    critical; no subjectAltName; not a CA; issued by the device CA."""
    assert [(a.oid, a.value) for a in cert.subject] == [
        (NameOID.COMMON_NAME, device), (NameOID.ORGANIZATIONAL_UNIT_NAME, factory)]
    extensions = {ext.oid: ext for ext in cert.extensions}
    ku = extensions.pop(ExtensionOID.KEY_USAGE)
    assert ku.critical and ku.value == x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    eku = extensions.pop(ExtensionOID.EXTENDED_KEY_USAGE)
    assert eku.critical and list(eku.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    basic = extensions.pop(ExtensionOID.BASIC_CONSTRAINTS)
    assert basic.critical and basic.value.ca is False
    aki = extensions.pop(ExtensionOID.AUTHORITY_KEY_IDENTIFIER)
    ca_ski = device_ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.value.key_identifier == ca_ski.digest
    extensions.pop(ExtensionOID.SUBJECT_KEY_IDENTIFIER)
    assert extensions == {}, f"extensions beyond FoundriesFactory's: {list(extensions)}"
    cert.verify_directly_issued_by(device_ca)


def test_registered_device_certificate_has_foundries_shape(backend, tmp_path):
    device = backend.register("3fa1b2c4-0001", tmp_path / "dev")
    _, cert_file = device_identity(device)
    chain = cert_file.read_bytes()
    assert chain.count(b"BEGIN CERTIFICATE") == 1, "client.pem holds the device certificate alone"
    assert_foundries_shape(load_cert(cert_file), "3fa1b2c4-0001", "certrotate-factory",
                           load_cert(backend.dir / "device-ca.crt"))


def test_san_only_when_the_operator_asks(backend, tmp_path):
    device = backend.register("dev-san", tmp_path / "dev", "--san", "dev-san.example")
    cert = load_cert(device_identity(device)[1])
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == \
        x509.SubjectAlternativeName([x509.DNSName("dev-san.example")])


def test_fioconfig_renews_a_registered_device(backend, tmp_path):
    """fioconfig's CSR, unmodified, against the reference EST server; then the new
    certificate is announced and used at the gateway as fioconfig's rotation does."""
    device = backend.register("3fa1b2c4-0002", tmp_path / "dev")
    key_file, cert_file = device_identity(device)
    old = load_cert(cert_file)
    key = new_key()
    reply = backend.est("POST", "simplereenroll", key=key_file, cert=cert_file,
                        data=fioconfig_b64_csr(key, old), headers={"Content-Type": "application/pkcs10"})
    assert reply.status_code in (200, 201), reply.text
    assert reply.headers["Content-Type"].split(";")[0] == "application/pkcs7-mime"
    [new] = pkcs7.load_der_pkcs7_certificates(base64.b64decode(b"".join(reply.content.split())))
    assert fioconfig_accepts(old, new)
    assert_foundries_shape(new, "3fa1b2c4-0002", "certrotate-factory", load_cert(backend.dir / "device-ca.crt"))
    assert new.public_key().public_numbers() == key.public_key().public_numbers()

    new_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    locked = backend.gateway(device, "PATCH", "/device", json={"next_pubkey": new_pem})
    assert locked.status_code == 200, locked.text
    new_key_file = write_file(tmp_path / "new.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)
    new_cert_file = write_file(tmp_path / "new.pem", new.public_bytes(serialization.Encoding.PEM), 0o644)
    assert backend.gateway(device, "GET", "/device", key=new_key_file, cert=new_cert_file).status_code == 200
    assert backend.gateway(device, "GET", "/device", key=key_file, cert=cert_file).status_code == 403


@pytest.fixture
def estserver(backend, tmp_path):
    """An EST server that behaves as foundriesio/estserver, holding the factory's device CA."""
    model = EstServerModel(authority(backend, "device-ca"), load_cert(backend.root_ca))
    with FaultyEst(authority(backend, "root"), model.ca, tmp_path / "estserver") as server:
        server.answer = model.answer
        server.model = model
        yield server


def rotate_through(estserver, device, tmp_path, rotation_id):
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)
    return run_agent(device, "rotate", "--rotation-id", rotation_id, "--est-server", estserver.url,
                     bin_dir=bin_dir)


def test_agent_rotates_through_estserver_on_an_lmp_device(backend, estserver, tmp_path):
    values = {"wifi-psk": "s3cret"}
    device, old = new_device(backend, tmp_path, "3fa1b2c4-0003", device_values=values, local_values=values)
    result = rotate_through(estserver, device, tmp_path, "certs-1700000001")
    assert result.returncode == 0, result.stderr
    assert_rotated(backend, device, old, device_values=values, local_values=values)
    # What estserver issued is what the device now uses, leaf alone, and it says so.
    _, cert_file = active_identity(device)
    assert load_cert(cert_file) == estserver.model.issued[-1]
    assert cert_file.read_bytes().count(b"BEGIN CERTIFICATE") == 1
    assert "chain of the issued certificate could not be checked on the device" in result.stderr
    # /cacerts twice: to find the issuing CA, then the completed rotation's trust anchor
    # check, which estserver's root alone leaves as it was.
    assert [r.operation for r in estserver.requests] == ["simplereenroll", "cacerts", "cacerts"]
    assert (device / "var/sota/root.crt").read_bytes() == backend.root_ca.read_bytes()


def test_estserver_dropping_the_san_is_accepted_and_logged(backend, estserver, tmp_path):
    device = backend.register("dev-san", tmp_path / "dev-san", "--san", "dev-san.example")
    result = rotate_through(estserver, device, tmp_path, "certs-1700000002")
    assert result.returncode == 0, result.stderr
    assert estserver.model.dropped == [ExtensionOID.SUBJECT_ALTERNATIVE_NAME.dotted_string]
    assert "left out the current certificate's subjectAltName" in result.stderr
    new = load_cert(active_identity(device)[1])
    with pytest.raises(x509.ExtensionNotFound):
        new.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert backend.gateway(device, "GET", "/device").status_code == 200


def test_configured_ca_bundle_gives_a_full_chain_check(backend, estserver, tmp_path):
    device = backend.register("3fa1b2c4-0004", tmp_path / "dev")
    write_file(device / "etc/certrotate/device-ca.pem", (backend.dir / "device-ca.crt").read_bytes(), 0o644)
    toml = device / "etc/certrotate/certrotate.toml"
    toml.write_text(toml.read_text().replace("[est]\n", '[est]\nca_bundle = "/etc/certrotate/device-ca.pem"\n'))
    result = rotate_through(estserver, device, tmp_path, "certs-1700000003")
    assert result.returncode == 0, result.stderr
    assert "could not be checked" not in result.stderr


def test_certificate_from_an_unknown_ca_is_refused_and_identity_kept(backend, estserver, tmp_path):
    """An EST server whose device CA is another key under the same name, its certificate
    nowhere on the device: refused before anything changes, with the real cause named."""
    device = backend.register("3fa1b2c4-0005", tmp_path / "dev")
    before = {p: p.read_bytes() for p in (device / "var/sota").iterdir() if p.is_file()}
    twin_key = new_key()
    twin_ca = authority(backend, "root").issue(estserver.model.ca.cert.subject, twin_key.public_key(), ca=True)
    estserver.model.ca = Authority(twin_key, twin_ca)
    result = rotate_through(estserver, device, tmp_path, "certs-1700000004")
    assert result.returncode == 1
    assert "authority key identifier is not the current certificate's" in result.stderr
    assert "est.ca_bundle" in result.stderr
    assert {p: p.read_bytes() for p in (device / "var/sota").iterdir() if p.is_file()} == before
    assert backend.gateway(device, "GET", "/device").status_code == 200
