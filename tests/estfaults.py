"""A deliberately faulty EST server over real TLS on 127.0.0.1.

The reference backend never sends a broken reply, so the bad-input cases
(malformed base64, a certificate for another key, a body cut off or reset
mid-way, ...) come from this server instead. It is a real HTTPS server
(http.server + ssl in a thread) with certificates from the test PKI; each
test sets ``server.answer`` to decide what every request gets back.
``good_answer`` behaves like a correct EST server, so a test can start from a
working exchange and break one thing.
"""

from __future__ import annotations

import base64
import datetime
import io
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest
import requests

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from pki import Authority, TestPki, cert_pem, key_pem, new_key, write_file

PKCS7_MIME = "application/pkcs7-mime; smime-type=certs-only"
EST_PATH = "/.well-known/est"


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    client_cert: x509.Certificate | None

    @property
    def operation(self) -> str:
        """The EST operation: the last path segment (cacerts, simplereenroll, ...)."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def csr(self) -> x509.CertificateSigningRequest:
        return x509.load_der_x509_csr(base64.b64decode(self.body))


@dataclass
class Answer:
    """What the server sends back.

    ``declared_length`` overrides Content-Length (None: the body's length;
    -1: no Content-Length, the body ends when the connection closes).
    ``reset_after`` sends that many body bytes, then resets the connection
    (TCP RST). ``cut_after`` sends that many body bytes, then closes cleanly.
    ``drip`` sends the whole reply, status line and headers included, one byte
    every ``drip`` seconds (each byte its own TLS record): a server too slow to
    ever finish, yet never silent long enough for a per-read timeout.
    """

    status: int = 200
    body: bytes = b""
    content_type: str | None = PKCS7_MIME
    headers: dict[str, str] = field(default_factory=dict)
    declared_length: int | None = None
    reset_after: int | None = None
    cut_after: int | None = None
    drip: float | None = None


def der_tlv(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + content


_OID_SIGNED_DATA = bytes.fromhex("06092a864886f70d010702")
_OID_DATA = bytes.fromhex("06092a864886f70d010701")


def pkcs7_der(certs: list[x509.Certificate]) -> bytes:
    """A certs-only PKCS#7 SignedData, built by hand so it can hold zero certs."""
    signed_data = (
        der_tlv(0x02, b"\x01")  # version
        + der_tlv(0x31, b"")  # digestAlgorithms
        + der_tlv(0x30, _OID_DATA)  # encapContentInfo
        + (der_tlv(0xA0, b"".join(c.public_bytes(serialization.Encoding.DER) for c in certs))
           if certs else b"")
        + der_tlv(0x31, b"")  # signerInfos
    )
    return der_tlv(0x30, _OID_SIGNED_DATA + der_tlv(0xA0, der_tlv(0x30, signed_data)))


def b64_lines(der: bytes, width: int = 64) -> bytes:
    text = base64.b64encode(der)
    return b"\r\n".join(text[i:i + width] for i in range(0, len(text), width)) + b"\r\n"


def certs_answer(certs: list[x509.Certificate], **kwargs) -> Answer:
    return Answer(body=b64_lines(pkcs7_der(certs)), **kwargs)


class FaultyEst:
    """An EST server on 127.0.0.1 whose answers a test chooses.

    Its TLS certificate is issued by ``root`` for ``names`` (a name other
    than 127.0.0.1 makes it "an EST server whose certificate names another
    host"); ``good_answer`` issues device certificates from ``issuer``.
    """

    def __init__(self, root: Authority, issuer: Authority, workdir: Path, *,
                 names: tuple[str, ...] = ("127.0.0.1",)):
        self.root = root
        self.issuer = issuer
        self.workdir = workdir
        self.requests: list[Request] = []
        self.tls_errors: list[str] = []
        self.answer: Callable[[Request], Answer] = self.good_answer
        workdir.mkdir(parents=True, exist_ok=True)
        # Devices may present their certificate without its issuing CA.
        self._client_ca = write_file(workdir / "est-client-ca.pem", root.pem + issuer.pem, 0o644)
        self.use_names(names)
        self._httpd = _TlsServer(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @classmethod
    def for_pki(cls, pki: TestPki, workdir: Path, **kwargs) -> "FaultyEst":
        return cls(pki.root, pki.device_ca, workdir, **kwargs)

    def use_names(self, names: tuple[str, ...]) -> None:
        """Serve a TLS certificate for ``names`` from the next connection on."""
        key = new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        cert = self.root.issue(subject, key.public_key(), server_names=list(names))
        cert_file = write_file(self.workdir / "est-server.pem", cert_pem(cert), 0o644)
        key_file = write_file(self.workdir / "est-server.key", key_pem(key), 0o600)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        context.load_verify_locations(self._client_ca)
        context.verify_mode = ssl.CERT_OPTIONAL
        self.context = context

    def forward_to(self, upstream: str, ca_file: Path, client_cert: tuple[Path, Path]) -> None:
        """Answer every request from now on by relaying it to the EST server at ``upstream``,
        authenticated by ``client_cert`` ((cert, key) files): the server is "fixed"."""

        def relay(request: Request) -> Answer:
            suffix = request.path[request.path.index(EST_PATH) + len(EST_PATH):]
            headers = {k: v for k, v in request.headers.items()
                       if k.lower() in ("content-type", "authorization", "content-transfer-encoding")}
            reply = requests.request(
                request.method, upstream + suffix, data=request.body or None, headers=headers,
                cert=(str(client_cert[0]), str(client_cert[1])), verify=str(ca_file), timeout=30,
            )
            passed = {k: v for k, v in reply.headers.items() if k.lower() == "retry-after"}
            return Answer(status=reply.status_code, body=reply.content,
                          content_type=reply.headers.get("Content-Type"), headers=passed)

        self.answer = relay

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self._httpd.server_address[1]}{EST_PATH}"

    def __enter__(self) -> "FaultyEst":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def issue(self, request: Request, *, subject: x509.Name | None = None, public_key=None,
              issuer: Authority | None = None, not_before: datetime.datetime | None = None,
              not_after: datetime.datetime | None = None) -> x509.Certificate:
        """A certificate for the request's CSR, with any one thing changed."""
        csr = request.csr()
        subject = subject or csr.subject
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            san = None
        return (issuer or self.issuer).issue(
            subject, public_key or csr.public_key(), not_before=not_before,
            not_after=not_after, san=san,
        )

    def good_answer(self, request: Request) -> Answer:
        """What a correct EST server answers."""
        if request.operation == "cacerts":
            return certs_answer([self.issuer.cert, self.root.cert])
        if request.operation in ("simpleenroll", "simplereenroll"):
            return certs_answer([self.issue(request)])
        if request.operation == "csrattrs":
            return Answer(status=204, body=b"", content_type=None)
        return Answer(status=404, body=b"no such EST operation\n", content_type="text/plain")


class _TlsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, handler, est: FaultyEst):
        self.est = est
        super().__init__(address, handler)

    def finish_request(self, request, client_address):
        # The TLS handshake runs here, in the connection's thread, so a client
        # that stalls or aborts it holds up nobody else.
        try:
            tls = self.est.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as err:
            self.est.tls_errors.append(str(err))
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            tls.close()

    def handle_error(self, request, client_address):
        # Clients hanging up on a fault are part of the tests, not news.
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _TlsServer

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        self._serve()

    def do_POST(self):
        self._serve()

    def _serve(self):
        answer = self._answer()
        if answer.drip is None:
            self._send(answer)
            return
        wire, self.wfile = self.wfile, io.BytesIO()
        self._send(answer)
        for byte in self.wfile.getvalue():
            wire.write(bytes([byte]))
            time.sleep(answer.drip)

    def _answer(self) -> Answer:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        peer = self.connection.getpeercert(binary_form=True)
        request = Request(
            self.command, self.path, dict(self.headers.items()), body,
            x509.load_der_x509_certificate(peer) if peer else None,
        )
        est = self.server.est
        est.requests.append(request)
        return est.answer(request)

    def _send(self, answer: Answer) -> None:
        self.close_connection = True
        self.send_response(answer.status)
        if answer.content_type:
            self.send_header("Content-Type", answer.content_type)
        if answer.declared_length != -1:
            declared = answer.declared_length
            self.send_header("Content-Length", str(len(answer.body) if declared is None else declared))
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()
        if answer.reset_after is not None:
            self.wfile.write(answer.body[:answer.reset_after])
            time.sleep(0.2)  # let the client start reading the body first
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        sent = answer.body if answer.cut_after is None else answer.body[:answer.cut_after]
        self.wfile.write(sent)


class Sleeps(list):
    """A ``sleep`` that records the waits instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)

    def elapsed(self) -> float:
        """A monotonic clock that moves by the recorded waits only."""
        return sum(self)


# Fixtures for the unit tests that talk to this server (imported by them).

@pytest.fixture
def factory() -> TestPki:
    return TestPki()


@pytest.fixture
def server(factory, tmp_path):
    with FaultyEst.for_pki(factory, tmp_path / "server") as faulty:
        yield faulty


@pytest.fixture
def ca_file(factory, tmp_path) -> str:
    return str(write_file(tmp_path / "root.crt", factory.root.pem, 0o644))


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()
