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


class RawTls:
    """One TLS connection to a server, bytes in and replies out, for what `requests`
    will not send: pipelined requests, bad framing, HTTP/0.9."""

    def __init__(self, url: str, ca_file: Path, client=None, timeout: float = 10, source: str | None = None):
        import socket
        import ssl
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        context = ssl.create_default_context(cafile=str(ca_file))
        if client:
            context.load_cert_chain(str(client[1]), str(client[0]))
        raw = socket.create_connection((parts.hostname, parts.port), timeout=timeout,
                                       source_address=(source, 0) if source else None)
        self.sock = context.wrap_socket(raw, server_hostname=parts.hostname)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> "RawTls":
        self.sock.sendall(data)
        return self

    def reply(self) -> tuple[int, dict, bytes] | None:
        """The next reply (status, headers with lower-case names, body), or None at EOF."""
        status_line = self.file.readline()
        if not status_line:
            return None
        headers = {}
        for line in iter(self.file.readline, b"\r\n"):
            if not line:
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self.file.read(int(headers.get("content-length", 0)))
        return int(status_line.split()[1]), headers, body

    def closed_by_server(self) -> bool:
        try:
            return self.file.read(1) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def http_request(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    """An HTTP/1.1 request's bytes; Content-Length from the body unless `headers` set framing."""
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    headers = dict(headers or {})
    if body and not any(h.lower() in ("content-length", "transfer-encoding") for h in headers):
        headers["Content-Length"] = str(len(body))
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
