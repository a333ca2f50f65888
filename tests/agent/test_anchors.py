"""certrotate.anchors: which roots a /cacerts reply may add or retire, with real certificates."""

from __future__ import annotations

import json
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from certrotate import anchors, certs
from pki import DAY, Authority, new_key, new_root, utcnow

NOW = time.time()


def cross(subject: Authority, issuer: Authority, **kwargs) -> x509.Certificate:
    """``subject``'s name and key, vouched for by ``issuer`` (RFC 4210 4.4's NewWithOld or OldWithNew)."""
    return issuer.issue(subject.cert.subject, subject.key.public_key(), ca=True, **kwargs)


@pytest.fixture(scope="module")
def old():
    return new_root("factory root CA")


@pytest.fixture(scope="module")
def new():
    return new_root("factory root CA 2")


def loaded(bundle: bytes) -> list[x509.Certificate]:
    return certs.parse_certs(bundle, "bundle")


def test_a_new_root_joins_through_a_cross_certificate_from_a_trusted_root(old, new):
    device_ca = new.intermediate("factory device CA 2").cert
    served = [device_ca, new.cert, cross(new, old), cross(old, new), old.cert]
    bundle, added, retired = anchors.plan([old.cert], served, NOW)
    assert loaded(bundle) == [old.cert, new.cert]
    assert added == [new.cert] and retired == []


@pytest.mark.bad_input("trust anchor update")
def test_a_new_root_nothing_trusted_vouches_for_is_refused(old, new):
    forger = new_root("factory root CA")  # the old root's very name, another key
    vouched_by_forger = cross(new, forger)
    for served in ([new.cert, old.cert],  # no cross-certificate at all
                   [new.cert, vouched_by_forger, old.cert],  # one signed by an untrusted key
                   [new.cert, cross(new_root("factory root CA 2"), old), old.cert]):  # for another key
        with pytest.raises(anchors.AnchorError, match="no cross-certificate signed by a trusted root") as err:
            anchors.plan([old.cert], served, NOW)
        assert "ca rollover" in err.value.hint


def self_signed_as(ca_key, subject: x509.Name, path_length=None) -> x509.Certificate:
    """A root minted by whoever holds ``ca_key``, under ``subject``."""
    return Authority(ca_key, x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(ca_key.public_key()).serial_number(1).not_valid_before(utcnow() - DAY)
                     .not_valid_after(utcnow() + DAY).sign(ca_key, hashes.SHA256())).issue(
        subject, ca_key.public_key(), ca=True, path_length=path_length)


@pytest.mark.bad_input("trust anchor update")
def test_the_device_ca_cannot_be_made_into_a_root(old):
    """The EST server holds the device CA's key: a root under the device CA's name and key,
    "vouched for" by the device CA's own certificate from the trusted root, is refused."""
    device_ca_key = new_key()
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "factory device CA")])
    device_ca = old.issue(subject, device_ca_key.public_key(), ca=True, path_length=0)
    minted = self_signed_as(device_ca_key, subject)
    with pytest.raises(anchors.AnchorError):  # pathLen 0: it may certify no CA, let alone be one
        anchors.plan([old.cert], [minted, device_ca, old.cert], NOW)
    unconstrained = old.issue(subject, device_ca_key.public_key(), ca=True)
    with pytest.raises(anchors.AnchorError):  # no pathLen, but it issued the device's certificate
        anchors.plan([old.cert], [minted, unconstrained, old.cert], NOW, issuers=(subject.public_bytes(),))


@pytest.mark.bad_input("trust anchor update")
def test_a_new_root_claiming_a_longer_path_than_its_cross_certificate_is_refused(old):
    key = new_key()
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "factory root CA 2")])
    broad = self_signed_as(key, subject)  # pathLen absent: any depth
    with pytest.raises(anchors.AnchorError):
        anchors.plan([old.cert], [broad, old.issue(subject, key.public_key(), ca=True, path_length=1)], NOW)
    narrow = self_signed_as(key, subject, path_length=1)
    _, added, _ = anchors.plan([old.cert], [narrow, old.issue(subject, key.public_key(), ca=True, path_length=1)],
                               NOW)
    assert added == [narrow]


def test_an_expired_trusted_root_vouches_for_nothing_and_a_root_is_added_once(new):
    expired_root = new_root("old")
    stale = Authority(expired_root.key, expired_root.issue(expired_root.cert.subject, expired_root.key.public_key(),
                                                           ca=True, not_before=utcnow() - 30 * DAY,
                                                           not_after=utcnow() - DAY))
    with pytest.raises(anchors.AnchorError):
        anchors.plan([stale.cert], [new.cert, cross(new, expired_root)], NOW)
    fresh = new_root("old 2")
    _, added, _ = anchors.plan([fresh.cert], [new.cert, new.cert, cross(new, fresh), fresh.cert], NOW)
    assert added == [new.cert]


@pytest.mark.bad_input("trust anchor update")
def test_an_expired_cross_certificate_vouches_for_nothing(old, new):
    expired = cross(new, old, not_before=utcnow() - 30 * DAY, not_after=utcnow() - DAY)
    with pytest.raises(anchors.AnchorError):
        anchors.plan([old.cert], [new.cert, expired, old.cert], NOW)


def test_a_root_the_server_no_longer_serves_is_retired(old, new):
    bundle, added, retired = anchors.plan([new.cert, old.cert], [new.intermediate("ca").cert, new.cert], NOW)
    assert loaded(bundle) == [new.cert] and added == [] and retired == [old.cert]


def test_nothing_changes_when_the_server_serves_what_is_trusted_or_no_root(old, new):
    assert anchors.plan([old.cert], [old.intermediate("ca").cert, old.cert], NOW)[1:] == ([], [])
    # foundriesio/estserver may serve an intermediate alone: no news about roots.
    bundle, added, retired = anchors.plan([old.cert], [old.intermediate("ca").cert], NOW)
    assert loaded(bundle) == [old.cert] and added == retired == []


def test_certificates_other_than_roots_in_the_anchor_file_stay(old, new):
    intermediate = old.intermediate("pinned intermediate").cert
    bundle, _, _ = anchors.plan([old.cert, intermediate], [new.cert, cross(new, old), old.cert], NOW)
    assert loaded(bundle) == [old.cert, intermediate, new.cert]


def test_due_at_most_daily_and_after_the_clock_went_back(tmp_path):
    assert anchors.due(tmp_path, NOW)  # never checked
    (tmp_path / anchors.STATE_FILE).write_text(json.dumps({"checked_at": NOW}))
    assert not anchors.due(tmp_path, NOW + DAY.total_seconds() - 1)
    assert anchors.due(tmp_path, NOW + DAY.total_seconds())
    assert anchors.due(tmp_path, NOW - 60)  # checked "in the future": the clock was wrong then
    (tmp_path / anchors.STATE_FILE).write_text(json.dumps({"checked_at": NOW, "pending": "ab"}))
    assert anchors.due(tmp_path, NOW + 1)  # a replaced file whose units were not restarted yet
    (tmp_path / anchors.STATE_FILE).write_text("{not json")
    assert anchors.due(tmp_path, NOW)
