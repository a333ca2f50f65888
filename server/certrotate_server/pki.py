"""X.509 building blocks: keys, CAs, TLS server certs, device certs, PKCS#7."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import string
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT_CA_DAYS = 30 * 365
DEVICE_CA_DAYS = 25 * 365
TLS_SERVER_DAYS = 10 * 365
# lmp-device-register issues 20-year initial device certificates.
INITIAL_DEVICE_DAYS = 20 * 365
# Tolerate small clock skew between the factory and devices.
BACKDATE = dt.timedelta(minutes=5)


class PkiError(Exception):
    """A certificate or key could not be read or does not qualify."""


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def pubkey_pem(public_key) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def pubkey_der(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def normalize_pubkey_pem(text: str) -> str:
    """Canonical PEM of a public key given as PEM text; PkiError when it is not one."""
    try:
        key = serialization.load_pem_public_key(text.encode())
    except (ValueError, TypeError) as err:
        raise PkiError(f"not a PEM public key: {err}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PkiError("public key is not an elliptic-curve key")
    return pubkey_pem(key)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def write_private(path: Path, data: bytes) -> None:
    """Write a private key file: created 0600, never world-readable, even briefly."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as err:
        raise PkiError(f"cannot read certificate {path}: {err}") from None


def load_key(path: Path):
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise PkiError(f"cannot read private key {path}: {err}") from None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _builder(subject: x509.Name, issuer: x509.Name, public_key, not_before, not_after):
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


PRINTABLE = set(string.ascii_letters + string.digits + " '()+,-./:=?")


def _attribute(oid, value: str) -> x509.NameAttribute:
    """PrintableString when the value allows it, else UTF8String: as Go's crypto/x509
    (FoundriesFactory) and strongSwan encode names, so their CSRs copy our Subjects
    byte for byte."""
    kind = _ASN1Type.PrintableString if set(value) <= PRINTABLE else _ASN1Type.UTF8String
    return x509.NameAttribute(oid, value, _type=kind)


def _name(cn: str, ou: str | None = None) -> x509.Name:
    """CN, then OU: lmp-device-register's order (src/openssl.cpp)."""
    attrs = [_attribute(NameOID.COMMON_NAME, cn)]
    if ou:
        attrs.append(_attribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    return x509.Name(attrs)


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    """digitalSignature, plus keyCertSign and cRLSign for a CA: nothing else, ever."""
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
        crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )


def _ca_extensions(builder, path_length: int | None):
    return builder.add_extension(
        x509.BasicConstraints(ca=True, path_length=path_length), critical=True
    ).add_extension(
        _key_usage(cert_sign=True),
        critical=True,
    )


def generation_suffix(generation: int) -> str:
    """The first root and device CA keep their names; each rollover's carry its generation."""
    return "" if generation == 1 else f" {generation}"


def make_root_ca(factory: str, key, generation: int = 1) -> x509.Certificate:
    now = _now()
    name = _name(f"{factory} root CA{generation_suffix(generation)}", factory)
    builder = _ca_extensions(
        _builder(name, name, key.public_key(), now - BACKDATE, now + dt.timedelta(days=ROOT_CA_DAYS)),
        path_length=1,
    )
    return builder.sign(key, hashes.SHA256())


def make_device_ca(factory: str, key, root_cert: x509.Certificate, root_key, generation: int = 1) -> x509.Certificate:
    now = _now()
    not_after = min(now + dt.timedelta(days=DEVICE_CA_DAYS), root_cert.not_valid_after_utc)
    builder = _ca_extensions(
        _builder(_name(f"{factory} device CA{generation_suffix(generation)}", factory), root_cert.subject,
                 key.public_key(),
                 now - BACKDATE, not_after),
        path_length=0,
    ).add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False
    )
    return builder.sign(root_key, hashes.SHA256())


def make_cross_cert(subject_cert: x509.Certificate, issuer_cert: x509.Certificate, issuer_key) -> x509.Certificate:
    """RFC 4210 4.4's NewWithOld / OldWithNew: ``subject_cert``'s root (its name and key)
    certified by the other root, so a chain ending in either is trusted by holders of both."""
    now = _now()
    not_after = min(subject_cert.not_valid_after_utc, issuer_cert.not_valid_after_utc)
    builder = _ca_extensions(
        _builder(subject_cert.subject, issuer_cert.subject, subject_cert.public_key(), now - BACKDATE, not_after),
        path_length=1,
    ).add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
    )
    return builder.sign(issuer_key, hashes.SHA256())


def make_tls_server_cert(cn: str, hostnames: list[str], key, root_cert, root_key) -> x509.Certificate:
    now = _now()
    sans: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    not_after = min(now + dt.timedelta(days=TLS_SERVER_DAYS), root_cert.not_valid_after_utc)
    builder = (
        _builder(_name(cn), root_cert.subject, key.public_key(), now - BACKDATE, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            _key_usage(cert_sign=False),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False
        )
    )
    return builder.sign(root_key, hashes.SHA256())


def device_subject(device: str, factory: str) -> x509.Name:
    return _name(device, factory)


def dns_san(names: list[str]) -> x509.SubjectAlternativeName | None:
    """A subjectAltName of DNS names; None for none (FoundriesFactory's device certificates have none)."""
    return x509.SubjectAlternativeName([x509.DNSName(name) for name in names]) if names else None


def issue_device_cert(
    subject: x509.Name,
    san: x509.SubjectAlternativeName | None,
    public_key,
    ca_cert: x509.Certificate,
    ca_key,
    days: int,
) -> x509.Certificate:
    """A client certificate in FoundriesFactory's shape: keyUsage digitalSignature and
    extendedKeyUsage clientAuth, both critical (lmp-device-register's CSR asks for
    exactly these); never a CA, never past the CA; a SAN only when ``san`` is given."""
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    builder = (
        _builder(subject, ca_cert.subject, public_key, now - BACKDATE, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(cert_sign=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def certs_only_pkcs7(certs: list[x509.Certificate]) -> bytes:
    """DER of a certs-only (degenerate SignedData) PKCS#7, as EST replies carry."""
    return pkcs7.serialize_certificates(certs, serialization.Encoding.DER)


def subject_alt_name(cert_or_csr):
    """The SubjectAlternativeName extension, or None."""
    try:
        return cert_or_csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
