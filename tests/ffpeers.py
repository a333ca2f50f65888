"""FoundriesFactory's own peers, modelled as their source code behaves.

They cannot run here (Go programs, not packaged), so these models do exactly
what the source does, byte for byte where bytes matter:

- ``fioconfig_csr`` and ``fioconfig_accepts``: foundriesio/fioconfig
  internal/rotate_est.go (at 63842481, the SRCREV meta-lmp scarthgap pins),
  createB64CsrDer and verifyNewCert. The CSR is Go's
  x509.CreateCertificateRequest over a template holding the current
  certificate's RawSubject and two ExtraExtensions, KeyUsage digitalSignature
  and ExtendedKeyUsage clientAuth, both critical; nothing else, no SAN.
- ``EstServerModel``: foundriesio/estserver's simplereenroll and cacerts
  (service.go, http handlers): the CSR's RawSubject and SAN must equal the
  client certificate's; extensions other than KeyUsage and ExtendedKeyUsage
  are dropped ("Unsupported CSR Extension"); the certificate is Go's
  CreateCertificate over {RawSubject, KeyUsage, ExtKeyUsage,
  BasicConstraintsValid, IsCA false}; the reply is 201,
  ``application/pkcs7-mime`` with no parameters, base64 on one line, a
  degenerate PKCS#7 holding the leaf alone; /cacerts serves the root bundle it
  was started with (the factory root only).
"""

from __future__ import annotations

import base64
import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from estfaults import Answer, Request, der_tlv, pkcs7_der
from pki import Authority

# The extnValue bytes fioconfig puts in its CSR and estserver insists on
# (asn1DigitalSignature, asn1TlsWebClientAuth in both sources).
KU_DIGITAL_SIGNATURE = bytes.fromhex("03020780")
EKU_CLIENT_AUTH = bytes.fromhex("300a06082b06010505070302")
OID_KEY_USAGE = bytes.fromhex("0603551d0f")
OID_EXT_KEY_USAGE = bytes.fromhex("0603551d25")
OID_SAN = bytes.fromhex("0603551d11")
OID_EXTENSION_REQUEST = bytes.fromhex("06092a864886f70d01090e")
ECDSA_WITH_SHA256 = der_tlv(0x30, bytes.fromhex("06082a8648ce3d040302"))
ESTSERVER_VALIDITY = datetime.timedelta(days=3 * 365)


def _extension(oid: bytes, value: bytes, critical: bool) -> bytes:
    return der_tlv(0x30, oid + (b"\x01\x01\xff" if critical else b"") + der_tlv(0x04, value))


def raw_subject(cert: x509.Certificate) -> bytes:
    """The DER Subject as it stands in the certificate (Go's RawSubject)."""
    return cert.subject.public_bytes()


def fioconfig_csr(key: ec.EllipticCurvePrivateKey, current: x509.Certificate) -> bytes:
    """DER of the CSR fioconfig's createB64CsrDer makes for ``key``."""
    extensions = der_tlv(0x30, _extension(OID_KEY_USAGE, KU_DIGITAL_SIGNATURE, True)
                         + _extension(OID_EXT_KEY_USAGE, EKU_CLIENT_AUTH, True))
    attributes = der_tlv(0xA0, der_tlv(0x30, OID_EXTENSION_REQUEST + der_tlv(0x31, extensions)))
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    info = der_tlv(0x30, der_tlv(0x02, b"\x00") + raw_subject(current) + spki + attributes)
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    return der_tlv(0x30, info + ECDSA_WITH_SHA256 + der_tlv(0x03, b"\x00" + signature))


def fioconfig_b64_csr(key, current) -> bytes:
    """What fioconfig POSTs: base64.StdEncoding of the DER, one line."""
    return base64.b64encode(fioconfig_csr(key, current))


def fioconfig_accepts(old: x509.Certificate, new: x509.Certificate) -> bool:
    """verifyNewCert: same RawSubject, and KeyUsage and ExtendedKeyUsage with exactly
    fioconfig's values (criticality unchecked)."""
    values = {ext.oid: ext.value.public_bytes() for ext in new.extensions}
    return (raw_subject(new) == raw_subject(old)
            and values.get(x509.oid.ExtensionOID.KEY_USAGE) == KU_DIGITAL_SIGNATURE
            and values.get(x509.oid.ExtensionOID.EXTENDED_KEY_USAGE) == EKU_CLIENT_AUTH)


def _san_der(item) -> bytes | None:
    try:
        return item.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.public_bytes()
    except x509.ExtensionNotFound:
        return None


class EstServerModel:
    """estserver's answers, for a ``FaultyEst`` (``faulty.answer = model.answer``).

    ``ca`` is the device CA it issues from (the factory's), ``root`` the
    certificate of its -root-cert file. ``issued`` keeps what it issued.
    """

    def __init__(self, ca: Authority, root: x509.Certificate):
        self.ca = ca
        self.root = root
        self.issued: list[x509.Certificate] = []
        self.dropped: list[str] = []  # the "Unsupported CSR Extension" log lines

    def answer(self, request: Request) -> Answer:
        if request.operation == "cacerts" and request.method == "GET":
            return self._pkcs7(200, [self.root])
        if request.operation == "simplereenroll" and request.method == "POST":
            return self._reenroll(request)
        return Answer(status=404, body=b"404 page not found\n", content_type="text/plain; charset=utf-8")

    def _reenroll(self, request: Request) -> Answer:
        if request.client_cert is None:
            return _text(401, "client certificate required")
        try:
            csr = x509.load_der_x509_csr(base64.b64decode(request.body))
        except ValueError as err:
            return _text(400, f"invalid CSR: {err}")
        if not csr.is_signature_valid:
            return _text(400, "invalid CSR signature")
        if csr.subject.public_bytes() != raw_subject(request.client_cert):
            return _text(400, "subject must match the current certificate's")
        if _san_der(csr) != _san_der(request.client_cert):
            return _text(400, "subject alternative names must match the current certificate's")
        key_usage = ext_key_usage = False
        for ext in csr.extensions:
            value = ext.value.public_bytes()
            if ext.oid == x509.oid.ExtensionOID.KEY_USAGE:
                if value != KU_DIGITAL_SIGNATURE:
                    return _text(400, "Unsupported CSR KeyUsage value")
                key_usage = True
            elif ext.oid == x509.oid.ExtensionOID.EXTENDED_KEY_USAGE:
                if value != EKU_CLIENT_AUTH:
                    return _text(400, "Unsupported CSR ExtendedKeyUsage value")
                ext_key_usage = True
            else:
                self.dropped.append(ext.oid.dotted_string)
        cert = self._issue(csr, key_usage, ext_key_usage)
        self.issued.append(cert)
        return self._pkcs7(201, [cert])

    def _issue(self, csr, key_usage: bool, ext_key_usage: bool) -> x509.Certificate:
        """Go's CreateCertificate: KeyUsage critical, ExtKeyUsage not, BasicConstraints
        critical, AuthorityKeyId from the CA's SubjectKeyId; no SubjectKeyId on a leaf."""
        now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        builder = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(self.ca.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(min(now + ESTSERVER_VALIDITY, self.ca.cert.not_valid_after_utc))
        )
        if key_usage:
            builder = builder.add_extension(x509.KeyUsage(
                True, False, False, False, False, False, False, False, False), critical=True)
        if ext_key_usage:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        ski = self.ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier(ski.digest, None, None), critical=False)
        cert = builder.sign(self.ca.key, hashes.SHA256())
        assert cert.subject.public_bytes() == csr.subject.public_bytes()  # RawSubject, as Go copies it
        return cert

    @staticmethod
    def _pkcs7(status: int, certs: list[x509.Certificate]) -> Answer:
        return Answer(status=status, body=base64.b64encode(pkcs7_der(certs)),
                      content_type="application/pkcs7-mime")


def _text(status: int, message: str) -> Answer:
    return Answer(status=status, body=(message + "\n").encode(), content_type="text/plain; charset=utf-8")
