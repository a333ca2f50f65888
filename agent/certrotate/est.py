"""EST client (RFC 7030, with RFC 8951's clarifications).

Requests and replies are base64 (line breaks tolerated on input, output
wrapped at 64 columns); media types are compared case-insensitively with
their parameters ignored. A 202 answer is waited out (Retry-After in seconds
or as an HTTP date, never less than a second) and the same CSR sent again: at
most MAX_RESENDS times, for at most ``max_wait`` seconds from the first
request (on the run's monotonic clock), and never past the run's deadline.
Transient network failures are retried by ``http.send``.
Every failure is an ``EstError`` saying what the server did and what the
operator can do.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import re
import time
from typing import Callable, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from . import http
from .deadline import Deadline
from .pki import der_items, der_oid, der_parse

PKCS7_MIME = "application/pkcs7-mime"
PKCS10 = "application/pkcs10"
CSRATTRS = "application/csrattrs"
DEFAULT_RETRY_AFTER = 60.0  # seconds, when a 202 does not say (or says nothing readable)
# A Retry-After of 0 or a past date would have the agent resend as fast as the server answers.
MIN_RETRY_AFTER = 1.0
# The server's default Retry-After (30 s) fills the default 900 s wait with 30 resends.
MAX_RESENDS = 30

T = TypeVar("T")
_SIGNED_DATA = der_oid("1.2.840.113549.1.7.2")


class EstError(http.TransportError):
    """An EST exchange that failed (on the wire or in what the server said);
    ``hint`` says what the operator can do, ``status`` is the HTTP status if any."""


class EstPending(EstError):
    """The EST server kept answering 202 past a wait bound (exit code 4)."""


class EstClient:
    def __init__(
        self,
        base_url: str,
        ca_file: str,
        client_cert: tuple[str, str] | None = None,
        *,
        label: str = "",
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        max_wait: float = 900.0,
        run: Deadline | None = None,
        reply_within: float = http.REPLY_DEADLINE,
    ):
        """``base_url`` ends in /.well-known/est; ``client_cert`` is (cert_path, key_path).

        ``clock`` is wall time (for Retry-After dates); ``run`` the run's deadline, whose
        monotonic clock also measures the wait for a 202."""
        self.base_url = base_url.rstrip("/") + (f"/{label.strip('/')}" if label else "")
        self.session = http.make_session(ca_file, client_cert)
        self.sleep = sleep
        self.clock = clock
        self.max_wait = max_wait
        self.run = run or Deadline(None)
        self.reply_within = reply_within

    def cacerts(self) -> list[x509.Certificate]:
        """The EST CA's certificates (/cacerts)."""
        return self._certs(self._send("GET", "cacerts"), "cacerts")

    def cacerts_if_changed(self, etag: str | None) -> tuple[list[x509.Certificate] | None, str | None]:
        """/cacerts and its ETag; None for the certificates when they still have ``etag`` (304)."""
        reply = self._send("GET", "cacerts", headers={"If-None-Match": etag} if etag else None,
                           point="anchors:cacerts")
        if reply.status == 304 and etag:
            return None, etag
        return self._certs(reply, "cacerts"), reply.headers.get("ETag")

    def simplereenroll(self, csr: x509.CertificateSigningRequest) -> list[x509.Certificate]:
        """Re-enroll, authenticated by the client certificate; the certificates returned."""
        return self._enroll("simplereenroll", csr, {})

    def simpleenroll(
        self, csr: x509.CertificateSigningRequest, username: str | None = None,
        password: str | None = None,
    ) -> list[x509.Certificate]:
        """Enroll, authenticated by the client certificate and/or HTTP basic auth."""
        headers = {}
        if username is not None:
            token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        return self._enroll("simpleenroll", csr, headers)

    def csrattrs(self) -> bytes:
        """The DER CSR attributes the server asks for; b"" when it has none (204/404)."""
        reply = self._send("GET", "csrattrs")
        if reply.status in (204, 404):
            return b""
        self._expect(reply, "csrattrs", (200,), CSRATTRS)
        return self._parse(reply, "csrattrs", unwrap64)

    def _enroll(self, operation: str, csr, headers: dict[str, str]) -> list[x509.Certificate]:
        body = wrap64(csr.public_bytes(serialization.Encoding.DER))
        headers = {"Content-Type": PKCS10, "Content-Transfer-Encoding": "base64", **headers}
        started = self.run.clock()
        sent = 0
        while True:
            reply = self._send("POST", operation, data=body, headers=headers)
            sent += 1
            if reply.status != 202:
                break
            wait = self._retry_after(reply)
            waited = self.run.clock() - started
            why_stop = self._why_stop_waiting(sent, waited, wait)
            if why_stop:
                raise EstPending(
                    f"EST {operation}: the server still holds the request pending (202) after "
                    f"{sent} requests in {waited:.0f} s; it asks for {wait:.0f} s more, and {why_stop}",
                    hint="the request waits for the EST server (manual approval?); run the "
                    "rotation again later to collect the certificate",
                    status=202,
                )
            self.sleep(wait)
        return self._certs(reply, operation)

    def _why_stop_waiting(self, sent: int, waited: float, wait: float) -> str | None:
        """Why another ``wait`` and resend would go past a bound; None if it would not."""
        if sent > MAX_RESENDS:
            return f"{MAX_RESENDS} resends are the most a run sends"
        if waited + wait > self.max_wait:
            return f"the wait bound is {self.max_wait:.0f} s (est.max_wait)"
        if wait >= self.run.left():
            return f"the run's {self.run.seconds:g} s deadline comes first"
        return None

    def _send(self, method: str, operation: str, point: str | None = None, **kwargs) -> http.Reply:
        url = f"{self.base_url}/{operation}"
        try:
            return http.send(self.session, method, url, point=point or f"est:{operation}",
                             sleep=self.sleep, reply_within=self.reply_within, run=self.run, **kwargs)
        except http.TransportError as err:
            raise EstError(f"EST {operation}: {err.args[0]}", hint=err.hint, status=err.status) from err

    def _retry_after(self, reply: http.Reply) -> float:
        value = reply.headers.get("Retry-After", "").strip()
        if not value:
            return DEFAULT_RETRY_AFTER
        if value.isascii() and value.isdigit():  # str.isdigit alone takes "²", which float() refuses
            return max(MIN_RETRY_AFTER, float(value))
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return DEFAULT_RETRY_AFTER
        return max(MIN_RETRY_AFTER, when.timestamp() - self.clock())

    def _expect(self, reply: http.Reply, operation: str, statuses, media_type: str) -> None:
        got = media_type_of(reply)
        if reply.status not in statuses:
            raise EstError(
                f"EST {operation} answered {reply.status}: {describe_body(reply)}",
                hint=_status_hint(reply.status),
                status=reply.status,
            )
        if got != media_type:
            raise EstError(
                f"EST {operation} answered {reply.status} with content type "
                f"{reply.headers.get('Content-Type', '(none)')!r} instead of {media_type}: "
                f"{describe_body(reply)}",
                hint="the URL may point at something other than an EST server (a proxy or a "
                "web page); check est.server in certrotate.toml",
                status=reply.status,
            )

    def _certs(self, reply: http.Reply, operation: str) -> list[x509.Certificate]:
        """The certificates of a 200/201 certs-only reply, or an EstError."""
        self._expect(reply, operation, (200, 201), PKCS7_MIME)
        certs = self._parse(reply, operation, lambda body: certs_only(unwrap64(body)))
        if not certs:
            raise EstError(
                f"EST {operation}: the PKCS#7 reply holds no certificate",
                hint="the EST server issued nothing; check the server's logs",
                status=reply.status,
            )
        return certs

    def _parse(self, reply: http.Reply, operation: str, parse: Callable[[bytes], T]) -> T:
        try:
            return parse(reply.body)
        except ValueError as err:
            raise EstError(
                f"EST {operation}: the reply is {err}",
                hint="the EST server sent a malformed reply; check the server",
                status=reply.status,
            ) from err


def wrap64(der: bytes) -> bytes:
    """base64, 64 columns a line."""
    text = base64.b64encode(der)
    return b"".join(text[i:i + 64] + b"\n" for i in range(0, len(text), 64))


def unwrap64(body: bytes) -> bytes:
    """Decode base64 that may carry line breaks and other whitespace; else ValueError."""
    compact = re.sub(rb"\s+", b"", body)
    if not compact:
        raise ValueError("not valid base64 (the body is empty)")
    try:
        return base64.b64decode(compact, validate=True)
    except binascii.Error as err:
        raise ValueError(f"not valid base64 ({err})") from err


def certs_only(der: bytes) -> list[x509.Certificate]:
    """The certificates of a DER PKCS#7 SignedData (RFC 5652); ValueError if it is not one."""
    try:
        content_info = der_parse(der)
        if content_info.tag != 0x30:
            raise ValueError("it is not a DER SEQUENCE")
        fields = content_info.items()
        if len(fields) != 2 or fields[0].encoded != _SIGNED_DATA or fields[1].tag != 0xA0:
            raise ValueError("its content type is not signedData")
        signed_data = der_parse(fields[1].content)
        parts = signed_data.items()
    except ValueError as err:
        raise ValueError(f"not PKCS#7 ({err})") from err
    # version, digestAlgorithms, encapContentInfo, then [0] certificates if present
    certificate_sets = [part for part in parts[3:] if part.tag == 0xA0]
    if not certificate_sets:
        return []
    try:
        return [x509.load_der_x509_certificate(item.encoded)
                for item in der_items(certificate_sets[0].content)]
    except ValueError as err:
        raise ValueError(f"a PKCS#7 whose certificates cannot be read ({err})") from err


def media_type_of(reply: http.Reply) -> str:
    """The Content-Type without parameters, lower case."""
    return reply.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


def describe_body(reply: http.Reply) -> str:
    """A short quote of the body for an error message."""
    text = reply.text
    if media_type_of(reply) == "text/html" or re.match(r"\s*<(!doctype\s+html|html)", text, re.I):
        title = re.search(r"<title[^>]*>(.*?)</title>", text, re.I | re.S)
        return "an HTML page" + (f" titled {title.group(1).strip()[:120]!r}" if title else "")
    line = reply.first_line()
    return repr(line) if line else "(empty body)"


def _status_hint(status: int) -> str:
    if status in (401, 403):
        return ("the EST server does not accept this device's certificate; check that the "
                "device is still registered and its certificate not revoked")
    if status == 404:
        return "check est.server (and est.label) in certrotate.toml"
    if 400 <= status < 500:
        return "the EST server rejected the request; its message above says why"
    return "check the EST server's logs"
