"""The device's new key, its CSR, and the checks on the certificate issued for it.

Only cryptography APIs present in 38.0 are used (devices carry Debian
bookworm's 38.0.4 and Yocto scarthgap's 42), so chain signatures, names,
validity and key usages are checked here by hand. Names and the
subjectAltName are compared as the DER bytes found in the certificates,
never as re-encoded parsed values, which can differ in string types.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

MAX_CHAIN = 8  # intermediates followed before giving up

# DER tags
SEQUENCE = 0x30
SET = 0x31
OID = 0x06
INTEGER = 0x02
BOOLEAN = 0x01
OCTET_STRING = 0x04
BIT_STRING = 0x03
UTC_TIME = 0x17
GENERALIZED_TIME = 0x18


class IssuedCertificateError(Exception):
    """The EST server's certificate cannot become the device's identity."""

    def __init__(self, message: str, *, hint: str):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.args[0]} ({self.hint})"


# --- DER, just enough to read certificates and PKCS#7 and to write a CSR ---

@dataclass(frozen=True)
class Der:
    """One DER element: its tag, its content octets, and its whole encoding."""

    tag: int
    content: bytes
    encoded: bytes

    def items(self) -> list["Der"]:
        return der_items(self.content)


def der_read(data: bytes, pos: int = 0) -> tuple[Der, int]:
    """The element starting at ``pos`` and the offset just past it."""
    start = pos
    if pos + 2 > len(data):
        raise ValueError(f"DER element cut short at byte {pos}")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise ValueError(f"unsupported DER tag {tag:#x} at byte {pos}")
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise ValueError(f"bad DER length at byte {start}")
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    end = pos + length
    if end > len(data):
        raise ValueError(f"DER element at byte {start} runs past the end of the data")
    return Der(tag, data[pos:end], data[start:end]), end


def der_items(content: bytes) -> list[Der]:
    """The elements of a constructed value's content, in order."""
    items = []
    pos = 0
    while pos < len(content):
        item, pos = der_read(content, pos)
        items.append(item)
    return items


def der_parse(data: bytes) -> Der:
    """Exactly one element filling ``data``."""
    item, end = der_read(data)
    if end != len(data):
        raise ValueError(f"{len(data) - end} stray bytes after the DER element")
    return item


def der(tag: int, *parts: bytes) -> bytes:
    content = b"".join(parts)
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + content


def der_oid(dotted: str) -> bytes:
    arcs = [int(arc) for arc in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return der(OID, bytes(body))


# --- the parts of a certificate compared byte for byte ---

@dataclass(frozen=True)
class TbsParts:
    serial: bytes  # DER INTEGER
    issuer: bytes  # DER Name
    subject: bytes  # DER Name
    not_before: datetime.datetime
    not_after: datetime.datetime
    public_key: bytes  # DER SubjectPublicKeyInfo
    extensions: dict[bytes, bytes]  # DER OID -> DER Extension

    def extension(self, oid: x509.ObjectIdentifier) -> bytes | None:
        return self.extensions.get(der_oid(oid.dotted_string))


def tbs_parts(cert: x509.Certificate) -> TbsParts:
    """The raw fields of ``cert``'s TBSCertificate."""
    fields = der_parse(cert.tbs_certificate_bytes).items()
    if fields and fields[0].tag == 0xA0:  # explicit version
        fields = fields[1:]
    if len(fields) < 6:
        raise ValueError("TBSCertificate has too few fields")
    serial, _algorithm, issuer, validity, subject, spki, *rest = fields
    extensions: dict[bytes, bytes] = {}
    for optional in rest:
        if optional.tag == 0xA3:
            for extension in der_parse(optional.content).items():
                extensions[extension.items()[0].encoded] = extension.encoded
    not_before, not_after = (_der_time(t) for t in validity.items())
    return TbsParts(serial.encoded, issuer.encoded, subject.encoded, not_before, not_after, spki.encoded,
                    extensions)


def validity(cert: x509.Certificate) -> tuple[datetime.datetime, datetime.datetime]:
    """notBefore and notAfter as aware UTC datetimes, on every cryptography version."""
    parts = tbs_parts(cert)
    return parts.not_before, parts.not_after


def _der_time(item: Der) -> datetime.datetime:
    text = item.content.decode("ascii")
    if item.tag == UTC_TIME:
        parsed = datetime.datetime.strptime(text, "%y%m%d%H%M%SZ")
    elif item.tag == GENERALIZED_TIME:
        parsed = datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ")
    else:
        raise ValueError(f"unexpected time tag {item.tag:#x}")
    return parsed.replace(tzinfo=datetime.timezone.utc)


def spki_der(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- the new key and its CSR ---

def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


_ECDSA_WITH_SHA256 = der(SEQUENCE, der_oid("1.2.840.10045.4.3.2"))
_EXTENSION_REQUEST = der_oid("1.2.840.113549.1.9.14")
_KEY_USAGE_DIGITAL_SIGNATURE = der(
    SEQUENCE, der_oid("2.5.29.15"), der(BOOLEAN, b"\xff"),
    der(OCTET_STRING, der(BIT_STRING, b"\x07\x80")),
)
_EKU_CLIENT_AUTH = der(
    SEQUENCE, der_oid("2.5.29.37"),
    der(OCTET_STRING, der(SEQUENCE, der_oid(ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string))),
)


def build_csr(key: ec.EllipticCurvePrivateKey, current: x509.Certificate) -> x509.CertificateSigningRequest:
    """A CSR for ``key`` naming the device as ``current`` does.

    The Subject and the subjectAltName extension are the current
    certificate's DER bytes, copied; the request adds KeyUsage
    digitalSignature (critical) and ExtendedKeyUsage clientAuth. Built by
    hand because re-encoding a parsed Name can change its string types.
    """
    parts = tbs_parts(current)
    extensions = [_KEY_USAGE_DIGITAL_SIGNATURE, _EKU_CLIENT_AUTH]
    san = parts.extension(x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    if san is not None:
        extensions.append(san)
    attributes = der(
        0xA0, der(SEQUENCE, _EXTENSION_REQUEST, der(SET, der(SEQUENCE, *extensions)))
    )
    info = der(
        SEQUENCE, der(INTEGER, b"\x00"), parts.subject, spki_der(key.public_key()), attributes
    )
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    request = der(SEQUENCE, info, _ECDSA_WITH_SHA256, der(BIT_STRING, b"\x00" + signature))
    return x509.load_der_x509_csr(request)


# --- checking what the EST server issued ---

_RETRY = "nothing was changed on the device; fix the EST server or its CA, then run the rotation again"


@dataclass(frozen=True)
class Accepted:
    """An issued certificate that may replace the current one, and what could not be checked.

    ``chain_checked`` is False when no certificate of the issuing CA was found:
    the leaf was accepted because it names the current certificate's issuer and
    authority key (the gateway decides at confirm). ``san_left_out`` is True when
    the current certificate has a subjectAltName the server did not copy.
    """

    leaf: x509.Certificate
    chain_checked: bool
    san_left_out: bool


def check_issued(
    issued: list[x509.Certificate],
    key: ec.EllipticCurvePrivateKey,
    current: x509.Certificate,
    anchors: list[x509.Certificate],
    intermediates: list[x509.Certificate],
    now: datetime.datetime,
) -> Accepted:
    """The one certificate in ``issued`` that can replace ``current``, or an error.

    The protocol's rule: the only end-entity certificate, certifying ``key``,
    Subject byte-identical to the current one, keyUsage digitalSignature and
    extendedKeyUsage clientAuth, valid at ``now`` (aware UTC); a
    subjectAltName, if it carries one, equal to the current one. It must chain
    to one of ``anchors`` through ``intermediates`` or the CA certificates sent
    with it; when its issuer's certificate is in none of them (estserver sends
    the leaf alone and serves only the root), it must come from the current
    certificate's issuer: same issuer name and authority key identifier.
    """
    try:
        return _check_issued(issued, key, current, anchors, intermediates, now)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise IssuedCertificateError(
            f"the issued certificate cannot be read: {err}", hint=_RETRY
        ) from err


def _check_issued(issued, key, current, anchors, intermediates, now) -> Accepted:
    leaves = [cert for cert in issued if not _is_ca(cert)]
    if len(leaves) != 1:
        raise IssuedCertificateError(
            f"the EST reply holds {len(leaves)} end-entity certificates; exactly one was expected",
            hint=_RETRY,
        )
    leaf = leaves[0]
    leaf_parts = tbs_parts(leaf)
    current_parts = tbs_parts(current)
    if leaf_parts.public_key != spki_der(key.public_key()):
        raise IssuedCertificateError(
            "the issued certificate is for another key than the one this rotation generated",
            hint=_RETRY,
        )
    if leaf_parts.subject != current_parts.subject:
        raise IssuedCertificateError(
            f"the issued certificate names another subject: {leaf.subject.rfc4514_string()!r} "
            f"instead of {current.subject.rfc4514_string()!r}",
            hint=_RETRY,
        )
    san_oid = x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME
    leaf_san = _extension_value(leaf_parts, san_oid)
    current_san = _extension_value(current_parts, san_oid)
    if leaf_san is not None and leaf_san != current_san:
        raise IssuedCertificateError(
            "the issued certificate's subjectAltName differs from the current certificate's",
            hint=_RETRY,
        )
    _check_time(leaf, leaf_parts, now, "the issued certificate")
    _check_client_auth(leaf)
    extra_cas = [cert for cert in issued if _is_ca(cert)]
    known = anchors + intermediates + extra_cas
    if any(tbs_parts(ca).subject == leaf_parts.issuer for ca in known):
        _check_chain(leaf, anchors, intermediates + extra_cas, now)
        chain_checked = True
    else:
        _check_same_issuer(leaf, leaf_parts, current, current_parts)
        chain_checked = False
    return Accepted(leaf, chain_checked, san_left_out=leaf_san is None and current_san is not None)


def _check_same_issuer(leaf, leaf_parts: TbsParts, current, current_parts: TbsParts) -> None:
    """With no certificate of the issuing CA on hand: only the current certificate's own CA."""
    leaf_aki = _key_identifier(leaf)
    if (leaf_parts.issuer == current_parts.issuer and leaf_aki is not None
            and leaf_aki == _key_identifier(current)):
        return
    if leaf_parts.issuer != current_parts.issuer:
        why = f"its issuer is not the current certificate's ({current.issuer.rfc4514_string()!r})"
    elif leaf_aki is None:
        why = "it has no authority key identifier to match the current certificate's"
    else:
        why = "its authority key identifier is not the current certificate's (another CA key)"
    raise IssuedCertificateError(
        f"the issued certificate comes from CA {leaf.issuer.rfc4514_string()!r}, whose certificate "
        f"is neither in the EST reply, client.pem, the EST server's /cacerts nor est.ca_bundle, "
        f"and {why}: nothing on the device vouches for it",
        hint="put the issuing CA's certificate in the file est.ca_bundle of certrotate.toml names "
        "(or have the EST server serve it on /cacerts); " + _RETRY,
    )


def _key_identifier(cert: x509.Certificate) -> bytes | None:
    aki = _extension(cert, x509.AuthorityKeyIdentifier)
    return None if aki is None else aki.key_identifier


def _extension_value(parts: TbsParts, oid: x509.ObjectIdentifier) -> bytes | None:
    """The extnValue octets (criticality aside) of an extension, or None."""
    encoded = parts.extension(oid)
    return None if encoded is None else der_parse(encoded).items()[-1].content


def _check_time(cert, parts: TbsParts, now: datetime.datetime, what: str) -> None:
    if now < parts.not_before:
        raise IssuedCertificateError(
            f"{what} ({cert.subject.rfc4514_string()}) is not valid yet: it starts "
            f"{parts.not_before.isoformat()}, and it is now {now.isoformat()}",
            hint="check the device clock and the EST CA's clock; " + _RETRY,
        )
    if now > parts.not_after:
        raise IssuedCertificateError(
            f"{what} ({cert.subject.rfc4514_string()}) expired {parts.not_after.isoformat()}, "
            f"and it is now {now.isoformat()}",
            hint="check the device clock and the EST CA's clock; " + _RETRY,
        )


def _extension(cert: x509.Certificate, kind):
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _is_ca(cert: x509.Certificate) -> bool:
    constraints = _extension(cert, x509.BasicConstraints)
    return bool(constraints and constraints.ca)


def _check_client_auth(leaf: x509.Certificate) -> None:
    """keyUsage digitalSignature and extendedKeyUsage clientAuth, both present (as fioconfig's verifyNewCert)."""
    usages = _extension(leaf, x509.ExtendedKeyUsage)
    if usages is None or not (
        ExtendedKeyUsageOID.CLIENT_AUTH in usages
        or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in usages
    ):
        raise IssuedCertificateError(
            "the issued certificate's extendedKeyUsage does not allow TLS client authentication"
            + (" (it has no extendedKeyUsage)" if usages is None else ""),
            hint=_RETRY,
        )
    key_usage = _extension(leaf, x509.KeyUsage)
    if key_usage is None or not key_usage.digital_signature:
        raise IssuedCertificateError(
            "the issued certificate's keyUsage lacks digitalSignature, which TLS client auth needs",
            hint=_RETRY,
        )


def _check_chain(leaf, anchors, intermediates, now) -> None:
    """IssuedCertificateError unless some path of ``intermediates`` leads from ``leaf`` to an
    anchor. Every path is tried: during a root CA rollover a CA's name is both a root
    (NewWithNew) and a cross-certificate (NewWithOld), and only one of them leads on."""
    failure = _path_to_anchor(leaf, anchors, intermediates, now, (), [])
    if failure is not None:
        raise failure


def _path_to_anchor(cert, anchors, intermediates, now, path, tried: list) -> IssuedCertificateError | None:
    """None if ``cert`` chains to an anchor; else why not (the failure of the longest attempt).
    Each CA is followed once (``tried``): a reply of many look-alike CAs costs a signature
    check per pair, not one per path."""
    issuer_name = tbs_parts(cert).issuer
    if any(tbs_parts(anchor).subject == issuer_name and signed_by(cert, anchor) for anchor in anchors):
        return None
    if len(path) >= MAX_CHAIN:
        return IssuedCertificateError(
            f"the issued certificate's chain is longer than {MAX_CHAIN} CA certificates", hint=_RETRY
        )
    parents = [ca for ca in intermediates
               if not any(ca is seen for seen in tried) and ca is not cert
               and tbs_parts(ca).subject == issuer_name and can_sign_certs(ca) and signed_by(cert, ca)]
    tried.extend(parents)
    failure = IssuedCertificateError(
        f"the issued certificate does not chain to the trust anchor: no trusted CA "
        f"named {cert.issuer.rfc4514_string()!r} signed {cert.subject.rfc4514_string()!r}",
        hint="the EST server's CA does not chain to the trust anchor in "
        "import.tls_cacert_path; " + _RETRY,
    )
    for parent in parents:
        try:
            _check_time(parent, tbs_parts(parent), now, "an intermediate CA certificate")
        except IssuedCertificateError as expired:
            failure = expired
            continue
        failure = _path_to_anchor(parent, anchors, intermediates, now, path + (parent,), tried)
        if failure is None:
            return None
    return failure


def can_sign_certs(cert: x509.Certificate) -> bool:
    if not _is_ca(cert):
        return False
    key_usage = _extension(cert, x509.KeyUsage)
    return key_usage is None or key_usage.key_cert_sign


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer``'s public key verifies ``cert``'s signature."""
    public_key = issuer.public_key()
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(
                cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
            )
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(
                cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                cert.signature_hash_algorithm,
            )
        elif isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            public_key.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        return False
    return True
