"""EST server (RFC 7030 with RFC 8951's clarifications)."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from . import devices, pki
from .httpbase import BaseHandler, HttpError
from .store import utcnow

EST_PREFIX = "/.well-known/est"
OPERATIONS = {"cacerts": "GET", "csrattrs": "GET", "simpleenroll": "POST", "simplereenroll": "POST"}
PKCS7_CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
# CsrAttrs: SEQUENCE { ecdsa-with-SHA256 } - sign the CSR with P-256/SHA-256.
CSR_ATTRS_DER = bytes.fromhex("300a06082a8648ce3d040302")
ALLOWED_KEY_USAGE = {"digital_signature"}
KEY_USAGE_FLAGS = (
    "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
    "key_agreement", "key_cert_sign", "crl_sign",
)


def b64_body(der: bytes, line_length: int) -> bytes:
    text = base64.b64encode(der)
    if line_length <= 0:
        return text + b"\n"
    return b"\r\n".join(text[i:i + line_length] for i in range(0, len(text), line_length)) + b"\r\n"


def parse_csr(body: bytes) -> x509.CertificateSigningRequest:
    """RFC 8951: the body is base64 whatever Content-Transfer-Encoding says."""
    try:
        der = base64.b64decode(re.sub(rb"\s+", b"", body), validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, "CSR body is not base64 (send base64 of the DER PKCS#10 request)") from None
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError as err:
        raise HttpError(400, f"body is not a DER PKCS#10 certificate request: {err}") from None
    if not csr.is_signature_valid:
        raise HttpError(400, "CSR signature does not verify; sign the request with the key it carries")
    if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
        raise HttpError(400, "CSR key must be an elliptic-curve key (P-256)")
    check_requested_usage(csr)
    return csr


def check_requested_usage(csr: x509.CertificateSigningRequest) -> None:
    """Client certificates only: refuse requests for a CA or for other key usages."""
    for ext in csr.extensions:
        value = ext.value
        if isinstance(value, x509.BasicConstraints) and value.ca:
            raise HttpError(400, "CSR asks for a CA certificate (BasicConstraints cA=TRUE); only client certificates are issued")
        if isinstance(value, x509.KeyUsage):
            asked = {flag for flag in KEY_USAGE_FLAGS if getattr(value, flag)}
            if asked - ALLOWED_KEY_USAGE:
                raise HttpError(
                    400, f"CSR asks for key usage {sorted(asked - ALLOWED_KEY_USAGE)}; only digitalSignature is issued"
                )
        if isinstance(value, x509.ExtendedKeyUsage):
            other = [oid.dotted_string for oid in value if oid != x509.ExtendedKeyUsageOID.CLIENT_AUTH]
            if other:
                raise HttpError(400, f"CSR asks for extended key usages {other}; only clientAuth is issued")


class EstHandler(BaseHandler):
    @property
    def settings(self):
        return self.server.app.factory.est

    def route(self, method: str, path: str):
        self.max_body = self.settings.max_body
        if not path.startswith(EST_PREFIX + "/"):
            raise HttpError(404, f"no EST resource at {path}; EST lives under {EST_PREFIX}/")
        parts = path[len(EST_PREFIX) + 1:].split("/")
        if len(parts) == 2:
            label, operation = parts
            if label not in self.settings.labels:
                raise HttpError(404, f"unknown CA label {label!r}; configured labels: {self.settings.labels or 'none'}")
        elif len(parts) == 1:
            operation = parts[0]
        else:
            raise HttpError(404, f"no EST resource at {path}")
        if operation not in OPERATIONS:
            raise HttpError(404, f"unknown EST operation {operation!r}; one of {sorted(OPERATIONS)}")
        if method != OPERATIONS[operation]:
            raise HttpError(405, f"{operation} takes {OPERATIONS[operation]}", {"Allow": OPERATIONS[operation]})
        getattr(self, operation)()

    def send_b64(self, der: bytes, content_type: str):
        self.send(200, b64_body(der, self.settings.b64_line_length), content_type,
                  {"Content-Transfer-Encoding": "base64"})

    def cacerts(self):
        """The factory's CA certificates (Factory.cacerts), with an ETag: devices ask daily
        whether the root changed, and a 304 answers them in a few bytes."""
        app = self.server.app
        etag = {"ETag": app.cacerts_etag}
        asked = [tag.strip() for tag in self.headers.get("If-None-Match", "").split(",")]
        if app.cacerts_etag in asked or "*" in asked:
            self.send(304, headers=etag)
            return
        self.send(200, b64_body(app.cacerts, self.settings.b64_line_length), PKCS7_CERTS_ONLY,
                  {"Content-Transfer-Encoding": "base64", **etag})

    def csrattrs(self):
        self.send_b64(CSR_ATTRS_DER, "application/csrattrs")

    def _read_csr(self) -> x509.CertificateSigningRequest:
        body = self.read_body()
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/pkcs10":
            raise HttpError(415, f"Content-Type must be application/pkcs10, not {ctype or 'missing'}")
        return parse_csr(body)

    def _device_cert(self) -> x509.Certificate | None:
        """The verified client certificate if it comes from the device CA and is not deny-listed."""
        cert = self.peer_cert()
        if cert is None:
            return None
        if cert.issuer not in self.server.app.device_ca_subjects:
            return None
        if devices.is_denied(self.server.app.store, cert):
            raise HttpError(403, "this certificate is deny-listed (replaced by a key rotation); use the current one")
        return cert

    def _basic_auth_ok(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        right_user = user == self.settings.username
        return self.server.app.password_guard.check(
            self.client_address[0],
            known=lambda: right_user and self.settings.password_known(password),
            verify=lambda: right_user and self.settings.password_ok(password))

    def simpleenroll(self):
        """Initial enrollment, with the factory's EST credentials (HTTP Basic).

        A device certificate is no credential here: it would let any device
        enroll new device names. A device renews its own with simplereenroll.
        """
        if not self._basic_auth_ok():
            raise HttpError(401, "authenticate with the factory's EST credentials (HTTP Basic); "
                            "a device renews its certificate with simplereenroll",
                            {"WWW-Authenticate": 'Basic realm="certrotate EST"'})
        csr = self._read_csr()
        cns = csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if len(cns) != 1:
            # Readers disagree on which of several CNs names the device (Go takes the last).
            raise HttpError(400, f"CSR Subject has {len(cns)} CNs; exactly one, naming the device, is needed")
        name = str(cns[0].value)
        try:
            devices.check_device_name(name)
        except devices.DeviceError as err:
            raise HttpError(400, err.message) from None
        self.identity = name
        store = self.server.app.store
        existing = devices.get_device(store, name)
        key = pki.pubkey_pem(csr.public_key())
        if existing is not None and existing["pubkey"] != key:
            raise HttpError(409, f"device {name!r} is already enrolled with another key; renew with simplereenroll")
        san = pki.subject_alt_name(csr)
        if san is not None and not self.settings.allow_csr_san:
            raise HttpError(400, "CSR carries a subjectAltName, which this factory does not issue "
                            "(device certificates name the device by CN, as FoundriesFactory's do); "
                            "leave it out, or init the factory with --allow-csr-san")
        self._await_approval(key, csr)

        def record(conn, cert):
            if existing is None:
                devices.add_device(conn, name, cert, None, "est-enroll")
            else:
                devices.record_certificate(conn, cert, name, "est-enroll")

        self._issue(csr.subject, san.value if san else None, csr, key, record)

    def simplereenroll(self):
        """Renewal: the CSR's Subject and SAN equal the authenticating certificate's, byte for byte."""
        current = self._device_cert()
        if current is None:
            raise HttpError(401, "simplereenroll needs the device's current certificate as TLS client certificate")
        cns = current.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        name = str(cns[0].value) if cns else ""
        self.identity = name or "-"
        store = self.server.app.store
        row = devices.get_device(store, name) if name else None
        if row is None:
            raise HttpError(403, f"unknown device {name!r}: not registered with this factory")
        # The gateway's rule: a certificate for any other key (one minted and never
        # announced) must not be renewable, or it outlives every rotation.
        if pki.pubkey_pem(current.public_key()) not in (row["pubkey"], row["next_pubkey"]):
            raise HttpError(403, f"this certificate's key is neither the current key of device {name!r} "
                            "nor its announced next key; renew with the device's current certificate")
        late = self._lateness(current, row)
        csr = self._read_csr()
        if csr.subject.public_bytes() != current.subject.public_bytes():
            raise HttpError(
                400,
                f"CSR Subject {csr.subject.rfc4514_string()!r} differs from the certificate's "
                f"{current.subject.rfc4514_string()!r}; copy the Subject byte for byte",
            )
        csr_san, cert_san = pki.subject_alt_name(csr), pki.subject_alt_name(current)
        csr_san_der = csr_san.value.public_bytes() if csr_san else None
        cert_san_der = cert_san.value.public_bytes() if cert_san else None
        if csr_san_der != cert_san_der:
            raise HttpError(400, "CSR subjectAltName differs from the certificate's; copy it byte for byte")
        key = pki.pubkey_pem(csr.public_key())
        self._await_approval(key, csr)

        def record(conn, cert):
            devices.record_certificate(conn, cert, name, "est-reenroll")
            if late is not None:
                # The gateway refuses the expired certificate, so the device cannot announce
                # its new key there: this request, made with the current key, announces it.
                conn.execute("UPDATE devices SET next_pubkey = ? WHERE name = ?", (key, name))
                self.server.app.store.add_factory_event(conn, "DEVICE_RENEWED_AFTER_EXPIRY", name, {
                    "device": name, "old-not-after": current.not_valid_after_utc.isoformat(),
                    "late-seconds": int(late.total_seconds()), "new-serial": format(cert.serial_number, "x"),
                })

        self._issue(current.subject, cert_san.value if cert_san else None, csr, key, record)

    def _lateness(self, cert: x509.Certificate, row) -> dt.timedelta | None:
        """How long ago `cert` expired (None: it is valid), if it may still renew.

        The TLS layer checked its chain and signatures but not its dates (an expired
        certificate reaches this handler): within the factory's window it renews
        the device's current key, and only that."""
        now = dt.datetime.now(dt.timezone.utc)
        if now < cert.not_valid_before_utc:
            raise HttpError(403, f"this certificate is not valid before {cert.not_valid_before_utc.isoformat()}; "
                            "check the device's clock and the CA's")
        late = now - cert.not_valid_after_utc
        if late <= dt.timedelta(0):
            return None
        window = self.settings.expired_renewal_days
        if late > dt.timedelta(days=window):
            # One short line: clients quote the first line of the reply.
            raise HttpError(403, f"certificate expired {cert.not_valid_after_utc:%Y-%m-%d} ({late.days} days ago), "
                            f"past the factory's {window}-day renewal window; operator: certrotate-server est "
                            "expired-renewal --days N, restart serve\nOr register the device again.")
        if pki.pubkey_pem(cert.public_key()) != row["pubkey"]:
            raise HttpError(403, "an expired certificate renews only the device's current key")
        return late

    def _issue(self, subject, san, csr, key: str, record) -> None:
        """Issue the certificate, store it with ``record(conn, cert)`` (an approval it
        used is spent in the same transaction), then reply with it."""
        ca_cert, ca_key = self.server.app.factory.device_ca()
        cert = pki.issue_device_cert(subject, san, csr.public_key(), ca_cert, ca_key, self.settings.validity_days)
        with self.server.app.store.transaction() as conn:
            record(conn, cert)
            conn.execute("DELETE FROM enrollment_requests WHERE pubkey = ?", (key,))
        self.send_b64(pki.certs_only_pkcs7([cert]), PKCS7_CERTS_ONLY)

    def _await_approval(self, key: str, csr) -> None:
        """Manual-approval mode: park the request until an operator approves it (202 + Retry-After)."""
        if not self.settings.manual_approval:
            return
        store = self.server.app.store
        row = store.query_one("SELECT status FROM enrollment_requests WHERE pubkey = ?", (key,))
        if row is not None and row["status"] == "approved":
            return
        if row is None:
            with store.transaction() as conn:
                conn.execute(
                    "INSERT OR IGNORE INTO enrollment_requests VALUES (?, ?, 'pending', ?)",
                    (key, csr.subject.rfc4514_string(), utcnow()),
                )
        retry = self.settings.retry_after
        # Not an error, but like one it ends the request with this reply.
        raise HttpError(202, f"enrollment awaits operator approval; retry in {retry} s", {"Retry-After": retry})
