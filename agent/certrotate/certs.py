"""Reading and writing PEM keys and certificates (cryptography >= 38 APIs only)."""

from __future__ import annotations

import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from . import fsutil

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


class KeyFileError(Exception):
    def __init__(self, message: str, *, hint: str):
        super().__init__(message)
        self.hint = hint


def parse_certs(data: bytes, origin: str) -> list[x509.Certificate]:
    """Every PEM certificate in ``data``, in order (cryptography 38 has no bulk loader)."""
    blocks = _PEM_CERT.findall(data)
    if not blocks:
        raise KeyFileError(f"{origin} holds no PEM certificate", hint=f"check {origin}")
    try:
        return [x509.load_pem_x509_certificate(block) for block in blocks]
    except ValueError as err:
        raise KeyFileError(f"{origin}: unreadable certificate: {err}", hint=f"check {origin}") from err


def load_certs(path: Path, origin: str | None = None) -> list[x509.Certificate]:
    origin = origin or str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as err:
        raise KeyFileError(f"{origin} is missing", hint="check the sota.toml import paths") from err
    return parse_certs(data, origin)


def load_key(path: Path, origin: str | None = None) -> ec.EllipticCurvePrivateKey:
    """The key in ``path``; fsutil.LinkedFileError when another hard link keeps a copy."""
    origin = origin or str(path)
    try:
        data = fsutil.read_secret(path)
    except FileNotFoundError as err:
        raise KeyFileError(f"{origin} is missing", hint="check the sota.toml import paths") from err
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        # Never echo the file: it holds a private key.
        raise KeyFileError(
            f"{origin} is not an unencrypted PEM private key", hint=f"check {origin}"
        ) from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{origin} is not an EC private key", hint="certrotate handles P-256 keys")
    return key


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return public_key_pem(key.public_key())


def public_key_pem(public_key) -> str:
    """SubjectPublicKeyInfo PEM: how the journal and the gateway name a public key."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def certs_pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)
