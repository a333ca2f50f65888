"""certrotate.pki: the CSR and the checks on an issued certificate, with real certificates."""

from __future__ import annotations

import datetime
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from certrotate import pki
from pki import DAY, Authority, TestPki, device_name, new_root, utcnow


@pytest.fixture(scope="module")
def factory():
    return TestPki()


@pytest.fixture
def device(factory):
    return factory.device()


def issue(factory, request_key, subject, **kwargs):
    return factory.device_ca.issue(subject, request_key.public_key(), **kwargs)


def check(factory, issued, key, current, *, now=None, intermediates=None):
    """The accepted leaf; the chain must have been verified."""
    accepted = accept(factory, issued, key, current, now=now, intermediates=intermediates)
    assert accepted.chain_checked
    return accepted.leaf


def accept(factory, issued, key, current, *, now=None, intermediates=None):
    return pki.check_issued(
        issued, key, current, [factory.root.cert],
        [factory.device_ca.cert] if intermediates is None else intermediates,
        now or utcnow(),
    )


def extension_der(cert, oid):
    return pki.tbs_parts(cert).extension(oid)


# --- the CSR ---

def test_new_key_is_p256():
    assert isinstance(pki.new_key().curve, ec.SECP256R1)


def test_csr_copies_subject_der_and_asks_for_client_auth(device):
    key = pki.new_key()
    csr = pki.build_csr(key, device.cert)
    assert csr.is_signature_valid
    assert pki.spki_der(csr.public_key()) == pki.spki_der(key.public_key())
    info = pki.der_parse(csr.tbs_certrequest_bytes).items()
    assert info[1].encoded == pki.tbs_parts(device.cert).subject
    key_usage = csr.extensions.get_extension_for_class(x509.KeyUsage)
    assert key_usage.critical and key_usage.value.digital_signature
    assert not key_usage.value.key_cert_sign
    eku = csr.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def unusual_subject_cert(factory):
    """A device cert whose Subject uses string types a re-encoder would change."""
    subject = x509.Name([
        x509.RelativeDistinguishedName([
            x509.NameAttribute(NameOID.COMMON_NAME, "3fa1b2c4-dev", _type=_ASN1Type.PrintableString),
        ]),
        x509.RelativeDistinguishedName([
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "factory", _type=_ASN1Type.T61String),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ünïcode Org", _type=_ASN1Type.BMPString),
        ]),
    ])
    san = x509.SubjectAlternativeName([
        x509.DNSName("dev-1.example"), x509.IPAddress(ipaddress.ip_address("10.0.0.7")),
        x509.UniformResourceIdentifier("urn:uuid:3fa1b2c4"),
    ])
    key = pki.new_key()
    return key, factory.device_ca.issue(subject, key.public_key(), san=san)


def test_csr_subject_and_san_are_byte_for_byte(factory):
    _, current = unusual_subject_cert(factory)
    csr = pki.build_csr(pki.new_key(), current)
    info = pki.der_parse(csr.tbs_certrequest_bytes).items()
    assert info[1].encoded == pki.tbs_parts(current).subject
    # a round trip through x509.Name would be allowed to differ; ours may not
    assert csr.subject == current.subject
    san_der = extension_der(current, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    assert san_der is not None and san_der in csr.tbs_certrequest_bytes
    assert (csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            == current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


def test_der_oid_encodes_multi_byte_arcs():
    assert pki.der_oid("1.2.840.113549.1.9.14") == bytes.fromhex("06092a864886f70d01090e")
    assert pki.der_oid(ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string) == bytes.fromhex(
        "06082b06010505070302")


@pytest.mark.parametrize("data", [b"", b"\x30", b"\x30\x05\x01", b"\x30\x84\xff\xff\xff\xff", b"\x1f\x01\x00"])
def test_der_reader_rejects_broken_input(data):
    with pytest.raises(ValueError):
        pki.der_parse(data)


def test_validity_is_aware_utc(device):
    not_before, not_after = pki.validity(device.cert)
    assert not_before.tzinfo is datetime.timezone.utc
    assert not_before < utcnow() < not_after
    assert abs((not_after - not_before) - 366 * DAY) < datetime.timedelta(seconds=5)


# --- checking the issued certificate ---

def test_good_certificate_passes(factory, device):
    key = pki.new_key()
    issued = issue(factory, key, device.cert.subject)
    assert check(factory, [issued], key, device.cert) == issued


def test_leaf_with_its_ca_passes_without_cacerts(factory, device):
    key = pki.new_key()
    issued = issue(factory, key, device.cert.subject)
    assert check(factory, [factory.device_ca.cert, issued], key, device.cert, intermediates=[]) == issued


def test_unusual_subject_and_san_pass(factory):
    _, current = unusual_subject_cert(factory)
    key = pki.new_key()
    csr = pki.build_csr(key, current)
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    issued = factory.device_ca.issue(current.subject, key.public_key(), san=san)
    assert check(factory, [issued], key, current) == issued


def expect_refusal(match, *args, **kwargs):
    with pytest.raises(pki.IssuedCertificateError, match=match) as caught:
        check(*args, **kwargs)
    assert "run the rotation again" in caught.value.hint
    return caught.value


def test_two_leaves_are_refused(factory, device):
    key = pki.new_key()
    issued = [issue(factory, key, device.cert.subject), issue(factory, key, device.cert.subject)]
    expect_refusal("holds 2 end-entity certificates", factory, issued, key, device.cert)


def test_only_ca_certificates_are_refused(factory, device):
    expect_refusal("holds 0 end-entity", factory, [factory.device_ca.cert], pki.new_key(), device.cert)


def test_certificate_for_another_key_is_refused(factory, device):
    key = pki.new_key()
    issued = issue(factory, pki.new_key(), device.cert.subject)
    expect_refusal("for another key", factory, [issued], key, device.cert)


def test_another_subject_is_refused(factory, device):
    key = pki.new_key()
    issued = issue(factory, key, device_name("someone-else", factory.factory))
    error = expect_refusal("names another subject", factory, [issued], key, device.cert)
    assert "someone-else" in str(error)


def test_same_looking_subject_with_other_string_type_is_refused(factory):
    key, current = unusual_subject_cert(factory)
    new = pki.new_key()
    # the same text, re-encoded as cryptography's defaults (UTF8String)
    reencoded = x509.Name([
        x509.RelativeDistinguishedName([x509.NameAttribute(attr.oid, attr.value) for attr in rdn])
        for rdn in current.subject.rdns
    ])
    issued = factory.device_ca.issue(reencoded, new.public_key())
    expect_refusal("names another subject", factory, [issued], new, current)


def test_other_san_is_refused(factory):
    _, current = unusual_subject_cert(factory)
    key = pki.new_key()
    issued = factory.device_ca.issue(
        current.subject, key.public_key(),
        san=x509.SubjectAlternativeName([x509.DNSName("other.example")]),
    )
    expect_refusal("subjectAltName differs", factory, [issued], key, current)


def test_san_left_out_by_the_server_is_accepted_and_reported(factory):
    """foundriesio/estserver drops a CSR's SAN ("Unsupported CSR Extension")."""
    _, current = unusual_subject_cert(factory)
    key = pki.new_key()
    issued = factory.device_ca.issue(current.subject, key.public_key())
    accepted = accept(factory, [issued], key, current)
    assert accepted.leaf == issued and accepted.san_left_out and accepted.chain_checked


def test_san_added_by_the_server_is_refused(factory, device):
    key = pki.new_key()
    issued = factory.device_ca.issue(device.cert.subject, key.public_key(),
                                     san=x509.SubjectAlternativeName([x509.DNSName("dev.example")]))
    expect_refusal("subjectAltName differs", factory, [issued], key, device.cert)


def test_same_san_is_not_reported(factory, device):
    key = pki.new_key()
    issued = issue(factory, key, device.cert.subject)
    assert not accept(factory, [issued], key, device.cert).san_left_out


def test_expired_is_refused(factory, device):
    key = pki.new_key()
    issued = issue(factory, key, device.cert.subject, not_before=utcnow() - 30 * DAY,
                   not_after=utcnow() - DAY)
    error = expect_refusal("expired", factory, [issued], key, device.cert)
    assert "clock" in error.hint


def test_not_yet_valid_is_refused(factory, device):
    key = pki.new_key()
    issued = issue(factory, key, device.cert.subject, not_before=utcnow() + DAY,
                   not_after=utcnow() + 30 * DAY)
    expect_refusal("not valid yet", factory, [issued], key, device.cert)


def test_validity_is_judged_at_the_given_time(factory, device):
    key = pki.new_key()
    issued = issue(factory, key, device.cert.subject)
    expect_refusal("expired", factory, [issued], key, device.cert, now=utcnow() + 400 * DAY)


def test_untrusted_ca_with_the_same_names_is_refused(factory, device):
    # A twin PKI whose root and device CA carry exactly the factory's names:
    # only the signature checks tell them apart.
    twin = TestPki(factory.factory)
    assert twin.device_ca.cert.subject == factory.device_ca.cert.subject
    key = pki.new_key()
    issued = twin.device_ca.issue(device.cert.subject, key.public_key())
    error = expect_refusal("does not chain to the trust anchor", factory,
                           [issued, twin.device_ca.cert], key, device.cert,
                           intermediates=[twin.device_ca.cert])
    assert "does not chain to the trust anchor in import.tls_cacert_path" in error.hint


def test_certificate_from_another_factory_is_refused(factory, device):
    other = TestPki("other-factory")
    key = pki.new_key()
    issued = other.device_ca.issue(device.cert.subject, key.public_key())
    expect_refusal("does not chain", factory, [issued, other.device_ca.cert], key, device.cert)


def test_issuer_nowhere_on_the_device_but_the_current_ones_is_accepted_unchecked(factory, device):
    """estserver's reply holds the leaf alone and /cacerts only the root; client.pem
    holds the leaf alone (lmp-device-register): the device CA is nowhere."""
    key = pki.new_key()
    issued = issue(factory, key, device.cert.subject)
    accepted = accept(factory, [issued], key, device.cert, intermediates=[])
    assert accepted.leaf == issued and not accepted.chain_checked


def test_issuer_nowhere_with_another_ca_key_is_refused(factory, device):
    # A twin device CA: the current certificate's issuer name, another key.
    twin = TestPki(factory.factory)
    key = pki.new_key()
    issued = twin.device_ca.issue(device.cert.subject, key.public_key())
    error = expect_refusal("authority key identifier is not the current certificate's",
                           factory, [issued], key, device.cert, intermediates=[])
    assert "est.ca_bundle" in error.hint and "trust anchor" not in error.hint


def test_issuer_nowhere_with_another_issuer_name_is_refused(factory, device):
    other = TestPki("other-factory")
    key = pki.new_key()
    issued = other.device_ca.issue(device.cert.subject, key.public_key())
    error = expect_refusal("issuer is not the current certificate's", factory, [issued], key,
                           device.cert, intermediates=[])
    assert "est.ca_bundle" in error.hint


def test_issuer_nowhere_without_authority_key_identifier_is_refused(factory, device):
    key = pki.new_key()
    issued = leaf_with(factory, device.cert.subject, key,
                       x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), key_usage=True)
    expect_refusal("no authority key identifier", factory, [issued], key, device.cert, intermediates=[])


def test_leaf_posing_as_intermediate_is_refused(factory, device):
    # a non-CA certificate with the device CA's name cannot sign
    rogue_key = pki.new_key()
    rogue = factory.root.issue(factory.device_ca.cert.subject, rogue_key.public_key())
    key = pki.new_key()
    issued = Authority(rogue_key, rogue).issue(device.cert.subject, key.public_key())
    expect_refusal("does not chain", factory, [issued], key, device.cert, intermediates=[rogue])


def test_expired_intermediate_is_refused(factory, device):
    old_key = pki.new_key()
    old_ca = Authority(old_key, factory.root.issue(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old CA")]), old_key.public_key(),
        ca=True, not_before=utcnow() - 30 * DAY, not_after=utcnow() - DAY))
    key = pki.new_key()
    issued = old_ca.issue(device.cert.subject, key.public_key())
    expect_refusal("intermediate CA certificate .* expired", factory, [issued], key,
                   device.cert, intermediates=[old_ca.cert])


def leaf_with(factory, subject, key, extension, *, key_usage=False, client_auth=False):
    """A device CA-issued certificate carrying ``extension`` (critical), and with
    ``key_usage`` / ``client_auth`` those two usages as well."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(factory.device_ca.cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(utcnow() - DAY).not_valid_after(utcnow() + DAY)
        .add_extension(extension, critical=True)
    )
    if key_usage:
        builder = builder.add_extension(x509.KeyUsage(
            True, False, False, False, False, False, False, False, False), critical=True)
    if client_auth:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=True)
    return builder.sign(factory.device_ca.key, hashes.SHA256())


def test_server_only_certificate_is_refused(factory, device):
    key = pki.new_key()
    issued = leaf_with(factory, device.cert.subject, key,
                       x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), key_usage=True)
    expect_refusal("does not allow TLS client authentication", factory, [issued], key, device.cert)


def test_certificate_without_eku_is_refused(factory, device):
    key = pki.new_key()
    issued = factory.device_ca.issue(device.cert.subject, key.public_key(), client_auth=False)
    expect_refusal("has no extendedKeyUsage", factory, [issued], key, device.cert)


def test_certificate_without_key_usage_is_refused(factory, device):
    key = pki.new_key()
    issued = leaf_with(factory, device.cert.subject, key,
                       x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]))
    expect_refusal("lacks digitalSignature", factory, [issued], key, device.cert)


def test_key_usage_without_digital_signature_is_refused(factory, device):
    key = pki.new_key()
    issued = leaf_with(factory, device.cert.subject, key, x509.KeyUsage(
        False, False, True, False, False, False, False, False, False), client_auth=True)
    expect_refusal("lacks digitalSignature", factory, [issued], key, device.cert)


def test_rsa_chain_is_verified():
    root_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa root")])
    root_cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(root_key.public_key()).serial_number(1)
        .not_valid_before(utcnow() - DAY).not_valid_after(utcnow() + DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    root = Authority(root_key, root_cert)
    current = root.issue(device_name("rsa-dev"), pki.new_key().public_key())
    key = pki.new_key()
    issued = root.issue(device_name("rsa-dev"), key.public_key())
    assert pki.check_issued([issued], key, current, [root_cert], [], utcnow()).leaf == issued
    assert not pki.signed_by(issued, new_root("rsa root").cert)


def test_overlong_chain_is_refused(factory, device):
    ca = factory.device_ca
    intermediates = [ca.cert]
    for depth in range(pki.MAX_CHAIN + 1):
        ca = ca.intermediate(f"level {depth}")
        intermediates.append(ca.cert)
    key = pki.new_key()
    issued = ca.issue(device.cert.subject, key.public_key())
    expect_refusal("longer than 8 CA certificates", factory, [issued], key, device.cert,
                   intermediates=intermediates)
    # one level less is fine
    short = factory.device_ca
    chain = [short.cert]
    for depth in range(pki.MAX_CHAIN - 1):
        short = short.intermediate(f"short {depth}")
        chain.append(short.cert)
    issued = short.issue(device.cert.subject, key.public_key())
    assert check(factory, [issued], key, device.cert, intermediates=chain) == issued
