"""CSR and certificate helpers for the server tests (real keys, real signatures)."""

from __future__ import annotations

import base64
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def load_key(path: Path):
    return serialization.load_pem_private_key(Path(path).read_bytes(), None)


def new_key():
    return ec.generate_private_key(ec.SECP256R1())


def write_key(path: Path, key) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def pubkey_pem(key) -> str:
    public = key.public_key() if hasattr(key, "public_key") else key
    return public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def make_csr(key, subject: x509.Name, san=None, extensions=()) -> bytes:
    """DER CSR for `key`, signed with it."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def renewal_csr(cert: x509.Certificate, key, *, subject=None, san="copy", extensions=()) -> bytes:
    """DER CSR for `key` that copies the Subject and SAN of `cert` unless told otherwise."""
    if san == "copy":
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            san = None
    return make_csr(key, subject or cert.subject, san, extensions)


def est_body(der: bytes) -> bytes:
    return base64.encodebytes(der)


def certs_from_est(body: bytes) -> list[x509.Certificate]:
    return pkcs7.load_der_pkcs7_certificates(base64.b64decode(b"".join(body.split())))


def reenroll(backend, device_root: Path, new_key_obj, key_path=None, cert_path=None, **csr_kwargs):
    """POST simplereenroll authenticated by the device's current cert; returns the response."""
    from backend import device_identity

    cur_key, cur_cert = device_identity(device_root)
    key_path, cert_path = key_path or cur_key, cert_path or cur_cert
    csr = renewal_csr(load_cert(cert_path), new_key_obj, **csr_kwargs)
    return backend.est("POST", "simplereenroll", key=key_path, cert=cert_path, data=est_body(csr),
                       headers={"Content-Type": "application/pkcs10"})
