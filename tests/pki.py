"""A test PKI and a device tree laid out as docs/contracts.md describes.

Real keys and certificates (P-256, ECDSA-SHA256), made fresh per test, so
TLS on loopback runs against them exactly as it would on a device. Uses no
cryptography API newer than 38 (devices carry Debian bookworm's 38.0.4).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAY = datetime.timedelta(days=1)


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        key = key.public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def device_name(common_name: str, factory: str = "test-factory") -> x509.Name:
    """A FoundriesFactory device Subject: CN = device UUID, OU = factory."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, factory),
        ]
    )


@dataclass
class Authority:
    """A CA: its key and certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return cert_pem(self.cert)

    def issue(
        self,
        subject: x509.Name,
        public_key,
        *,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        ca: bool = False,
        client_auth: bool = True,
        server_names: list[str] | None = None,
        san: x509.SubjectAlternativeName | None = None,
        path_length: int | None = None,
    ) -> x509.Certificate:
        """Sign a certificate for ``public_key``.

        ``server_names`` makes a TLS server certificate (DNS names and IP
        addresses); otherwise a client certificate (``client_auth`` chooses
        whether it carries the clientAuth extended key usage).
        """
        now = utcnow()
        not_before = not_before or now - DAY
        not_after = not_after or now + 365 * DAY
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )
        if ca:
            builder = builder.add_extension(_key_usage(cert_sign=True), critical=True)
        else:
            builder = builder.add_extension(_key_usage(cert_sign=False), critical=True)
            if server_names:
                builder = builder.add_extension(
                    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
                ).add_extension(_server_san(server_names), critical=False)
            elif client_auth:
                builder = builder.add_extension(
                    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
                )
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def intermediate(self, name: str) -> "Authority":
        key = new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        return Authority(key, self.issue(subject, key.public_key(), ca=True))


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _server_san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def new_root(name: str = "test-factory root") -> Authority:
    """A self-signed root CA."""
    key = new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = utcnow()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - DAY)
        .not_valid_after(now + 3650 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(key, cert)


@dataclass
class Identity:
    """A key and the certificate issued for it."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


class TestPki:
    """A factory's PKI: a root, a device-issuing CA under it, TLS server certs.

    ``root`` is the trust anchor that /var/sota/root.crt holds; device
    certificates are issued by ``device_ca`` (an intermediate), as in a
    FoundriesFactory.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, factory: str = "test-factory"):
        self.factory = factory
        self.root = new_root(f"{factory} root")
        self.device_ca = self.root.intermediate(f"{factory} device CA")

    def server(self, names: list[str] = ("127.0.0.1", "localhost")) -> Identity:
        """A TLS server identity for the given host names, issued by the root."""
        key = new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        return Identity(key, self.root.issue(subject, key.public_key(), server_names=list(names)))

    def device(
        self,
        common_name: str | None = None,
        *,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> Identity:
        """A device identity: CN = a UUID (or ``common_name``), OU = factory."""
        key = key or new_key()
        cert = self.device_ca.issue(
            device_name(common_name or str(uuid.uuid4()), self.factory),
            key.public_key(),
            not_before=not_before,
            not_after=not_after,
        )
        return Identity(key, cert)

    def device_chain_pem(self, identity: Identity) -> bytes:
        """The device certificate followed by its issuing CA, as client.pem holds it."""
        return cert_pem(identity.cert) + self.device_ca.pem


SOTA_TOML = """\
[tls]
server = "{gateway_url}"
ca_source = "file"
pkey_source = "file"
cert_source = "file"

[provision]
primary_ecu_hardware_id = "intel-corei7-64"

[uptane]
repo_server = "{gateway_url}/repo"
key_source = "file"

[pacman]
type = "ostree"
tags = "main"

[storage]
type = "sqlite"
path = "/var/sota/"

[import]
base_path = "/var/sota"
tls_cacert_path = "/var/sota/root.crt"
tls_clientcert_path = "/var/sota/client.pem"
tls_pkey_path = "/var/sota/pkey.pem"
"""

CERTROTATE_TOML = """\
[est]
server = "{est_url}"

[services]
restart = {restart}
"""


def write_file(path: Path, data: bytes | str, mode: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return path


@dataclass
class DeviceTree:
    """A device's files under ``root`` (what the agent's ``--root`` names)."""

    root: Path
    pki: TestPki
    identity: Identity

    @property
    def sota(self) -> Path:
        return self.root / "var/sota"

    @property
    def sota_toml(self) -> Path:
        return self.sota / "sota.toml"

    @property
    def state_dir(self) -> Path:
        return self.sota / "certrotate"

    @property
    def certrotate_toml(self) -> Path:
        return self.root / "etc/certrotate/certrotate.toml"


def write_device_tree(
    root: Path,
    pki: TestPki,
    *,
    gateway_url: str = "https://127.0.0.1:8443",
    est_url: str = "https://127.0.0.1:8444/.well-known/est",
    identity: Identity | None = None,
    restart: list[str] = ("aktualizr-lite.service", "fioconfig.service"),
) -> DeviceTree:
    """Write the device tree of docs/contracts.md under ``root``."""
    identity = identity or pki.device()
    sota = root / "var/sota"
    write_file(sota / "sota.toml", SOTA_TOML.format(gateway_url=gateway_url), 0o644)
    write_file(sota / "root.crt", pki.root.pem, 0o644)
    write_file(sota / "pkey.pem", key_pem(identity.key), 0o600)
    write_file(sota / "client.pem", pki.device_chain_pem(identity), 0o644)
    restart_list = "[" + ", ".join(f'"{unit}"' for unit in restart) + "]"
    write_file(
        root / "etc/certrotate/certrotate.toml",
        CERTROTATE_TOML.format(est_url=est_url, restart=restart_list),
        0o644,
    )
    (sota / "certrotate").mkdir(mode=0o700, exist_ok=True)
    return DeviceTree(root, pki, identity)
