"""certrotate.est against a real EST server over TLS on 127.0.0.1 (tests/estfaults.py)."""

from __future__ import annotations

import base64
import email.utils
import time

import pytest
from cryptography.hazmat.primitives import serialization

from certrotate import est, pki
from certrotate.deadline import Deadline
from estfaults import (  # noqa: F401 (fixtures)
    Answer, FaultyEst, b64_lines, ca_file, certs_answer, factory, pkcs7_der, server, sleeps,
)
from pki import key_pem, utcnow, write_file

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def device(factory, tmp_path):
    identity = factory.device()
    cert = write_file(tmp_path / "client.pem", factory.device_chain_pem(identity), 0o644)
    key = write_file(tmp_path / "pkey.pem", key_pem(identity.key), 0o600)
    identity.files = (str(cert), str(key))
    return identity


@pytest.fixture
def client(server, ca_file, device, sleeps):
    return est.EstClient(server.url, ca_file, device.files, sleep=sleeps)


def reenroll(client, device):
    key = pki.new_key()
    return key, client.simplereenroll(pki.build_csr(key, device.cert))


# --- the good exchange ---

def test_cacerts(client, factory, server):
    assert client.cacerts() == [factory.device_ca.cert, factory.root.cert]
    assert server.requests[0].method == "GET"
    assert server.requests[0].path == "/.well-known/est/cacerts"


def test_simplereenroll_sends_wrapped_pkcs10_with_client_cert(client, device, server, factory, ca_file):
    key, issued = reenroll(client, device)
    request = server.requests[0]
    assert request.path == "/.well-known/est/simplereenroll"
    assert request.headers["Content-Type"] == "application/pkcs10"
    assert request.client_cert == device.cert
    lines = request.body.decode().splitlines()
    assert len(lines) > 2
    assert all(len(line) == 64 for line in lines[:-1]) and 0 < len(lines[-1]) <= 64
    csr = request.csr()
    assert pki.spki_der(csr.public_key()) == pki.spki_der(key.public_key())
    leaf = pki.check_issued(issued, key, device.cert, [factory.root.cert], client.cacerts(), utcnow()).leaf
    assert pki.spki_der(leaf.public_key()) == pki.spki_der(key.public_key())


def test_simpleenroll_with_basic_auth(client, device, server):
    key = pki.new_key()
    client.simpleenroll(pki.build_csr(key, device.cert), "dev-1", "s3cret")
    request = server.requests[0]
    assert request.path == "/.well-known/est/simpleenroll"
    assert request.headers["Authorization"] == "Basic " + base64.b64encode(b"dev-1:s3cret").decode()


def test_ca_label_is_in_the_path(server, ca_file, device, sleeps):
    labelled = est.EstClient(server.url + "/", ca_file, device.files, label="fleet-a", sleep=sleeps)
    labelled.cacerts()
    assert server.requests[0].path == "/.well-known/est/fleet-a/cacerts"


def test_media_type_compared_loosely(client, server, factory):
    server.answer = lambda request: certs_answer(
        [factory.device_ca.cert], content_type="Application/PKCS7-MIME ; smime-type=CERTS-ONLY")
    assert client.cacerts() == [factory.device_ca.cert]


@pytest.mark.parametrize("layout", ["one line", "76 columns CRLF", "ragged whitespace"])
def test_base64_line_breaks_tolerated(client, server, factory, layout):
    text = base64.b64encode(pkcs7_der([factory.device_ca.cert]))
    if layout == "76 columns CRLF":
        text = b"\r\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    elif layout == "ragged whitespace":
        text = b"  " + b"\n \t".join(text[i:i + 13] for i in range(0, len(text), 13)) + b"\n\n"
    server.answer = lambda request: Answer(body=text)
    assert client.cacerts() == [factory.device_ca.cert]


def test_wrap64():
    wrapped = est.wrap64(bytes(range(256)) * 3)
    assert est.unwrap64(wrapped) == bytes(range(256)) * 3
    assert {len(line) for line in wrapped.splitlines()[:-1]} == {64}
    assert wrapped.endswith(b"\n")


def test_csrattrs(client, server):
    assert client.csrattrs() == b""
    server.answer = lambda request: Answer(body=b64_lines(b"\x30\x00"), content_type="application/csrattrs")
    assert client.csrattrs() == b"\x30\x00"


# --- 202 and Retry-After ---

def pending_then_good(server, *pending: Answer):
    answers = list(pending)
    server.answer = lambda request: answers.pop(0) if answers else server.good_answer(request)


def test_202_waits_and_resends_the_same_csr(client, device, server, sleeps):
    pending_then_good(server, Answer(status=202, content_type=None, headers={"Retry-After": "3"}),
                      Answer(status=202, content_type=None, headers={"Retry-After": "7"}))
    reenroll(client, device)
    assert sleeps == [3.0, 7.0]
    bodies = [request.body for request in server.requests]
    assert len(bodies) == 3 and bodies[0] == bodies[1] == bodies[2]


def test_202_with_http_date(server, ca_file, device, sleeps):
    now = 1_800_000_000.0
    when = email.utils.formatdate(now + 42, usegmt=True)
    client = est.EstClient(server.url, ca_file, device.files, sleep=sleeps, clock=lambda: now)
    pending_then_good(server, Answer(status=202, content_type=None, headers={"Retry-After": when}))
    reenroll(client, device)
    assert sleeps == [42.0]


def test_202_without_retry_after_waits_the_default(client, device, server, sleeps):
    pending_then_good(server, Answer(status=202, content_type=None))
    reenroll(client, device)
    assert sleeps == [est.DEFAULT_RETRY_AFTER]


def test_202_beyond_the_bound_is_pending(server, ca_file, device, sleeps):
    client = est.EstClient(server.url, ca_file, device.files, sleep=sleeps, max_wait=100,
                           run=Deadline(None, sleeps.elapsed))
    server.answer = lambda request: Answer(status=202, content_type=None, headers={"Retry-After": "40"})
    with pytest.raises(est.EstPending) as caught:
        reenroll(client, device)
    assert sleeps == [40.0, 40.0]
    assert len(server.requests) == 3
    assert "rotation again later" in caught.value.hint
    assert "after 3 requests in 80 s" in str(caught.value)


@pytest.mark.bad_input("EST 202 asking for no wait")
def test_202_waits_at_least_a_second_whatever_retry_after_says(client, device, server, sleeps):
    an_hour_ago = email.utils.formatdate(time.time() - 3600, usegmt=True)
    pending_then_good(server, *(Answer(status=202, content_type=None, headers={"Retry-After": value})
                                for value in ("0", an_hour_ago, "-3", "soon", "\u00b2")))
    reenroll(client, device)
    assert sleeps == [1.0, 1.0, est.DEFAULT_RETRY_AFTER, est.DEFAULT_RETRY_AFTER, est.DEFAULT_RETRY_AFTER]


@pytest.mark.bad_input("EST 202 asking for no wait")
def test_202_resends_are_bounded_in_number(server, ca_file, device, sleeps):
    client = est.EstClient(server.url, ca_file, device.files, sleep=sleeps, max_wait=100,
                           run=Deadline(None, sleeps.elapsed))
    server.answer = lambda request: Answer(status=202, content_type=None, headers={"Retry-After": "1"})
    with pytest.raises(est.EstPending, match="the most a run sends"):
        reenroll(client, device)
    assert len(server.requests) == est.MAX_RESENDS + 1


@pytest.mark.bad_input("EST 202 asking for no wait")
def test_202_wait_stops_before_the_run_deadline(server, ca_file, device, sleeps):
    client = est.EstClient(server.url, ca_file, device.files, sleep=sleeps, run=Deadline(100, sleeps.elapsed))
    server.answer = lambda request: Answer(status=202, content_type=None, headers={"Retry-After": "40"})
    with pytest.raises(est.EstPending, match="the run's 100 s deadline comes first"):
        reenroll(client, device)
    assert sleeps == [40.0, 40.0]


# --- bad replies ---

def refused(client, device, match):
    with pytest.raises(est.EstError, match=match) as caught:
        reenroll(client, device)
    assert caught.value.hint
    return caught.value


def test_malformed_base64(client, device, server):
    server.answer = lambda request: Answer(body=b"MIIB*not base64!\n")
    refused(client, device, "EST simplereenroll: the reply is not valid base64")


def test_empty_body(client, device, server):
    server.answer = lambda request: Answer(body=b"")
    refused(client, device, "not valid base64 \\(the body is empty\\)")


def test_not_pkcs7(client, device, server):
    # a bare certificate: valid DER, valid base64, not a PKCS#7
    der = device.cert.public_bytes(serialization.Encoding.DER)
    server.answer = lambda request: Answer(body=b64_lines(der))
    refused(client, device, "the reply is not PKCS#7 \\(its content type is not signedData\\)")


def test_garbage_der(client, device, server):
    server.answer = lambda request: Answer(body=b64_lines(b"hello, world"))
    refused(client, device, "the reply is not PKCS#7")


def test_pkcs7_with_unreadable_certificate(client, device, server):
    bogus = bytearray(pkcs7_der([device.cert]))
    start = bytes(bogus).index(device.cert.tbs_certificate_bytes)
    bogus[start + 4:start + 8] = b"\xff\xff\xff\xff"  # break the encoding inside the TBS
    server.answer = lambda request: Answer(body=b64_lines(bytes(bogus)))
    refused(client, device, "certificates cannot be read")


def test_pkcs7_with_no_certificate(client, device, server):
    server.answer = lambda request: certs_answer([])
    error = refused(client, device, "the PKCS#7 reply holds no certificate")
    assert "issued nothing" in error.hint


def test_wrong_content_type(client, device, server, factory):
    server.answer = lambda request: certs_answer([factory.device_ca.cert], content_type="application/json")
    error = refused(client, device, "content type 'application/json' instead of application/pkcs7-mime")
    assert "est.server" in error.hint


def test_html_error_page(client, device, server):
    page = b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
    server.answer = lambda request: Answer(body=page, content_type="text/html; charset=utf-8")
    refused(client, device, "with content type .*text/html.*an HTML page titled '502 Bad Gateway'")


def test_html_error_page_with_error_status(client, device, server):
    page = b"<html><head><title>Access denied</title></head></html>"
    server.answer = lambda request: Answer(status=403, body=page, content_type="text/html")
    error = refused(client, device, "answered 403: an HTML page titled 'Access denied'")
    assert error.status == 403


def test_4xx_with_text_body_quotes_its_first_line(client, device, server):
    server.answer = lambda request: Answer(
        status=400, body=b"\nCSR subject does not match the authenticated device\nsecond line\n",
        content_type="text/plain")
    error = refused(client, device, "answered 400: 'CSR subject does not match the authenticated device'")
    assert "second line" not in str(error)
    assert len(server.requests) == 1


def test_401_hint_names_the_device_certificate(client, device, server):
    server.answer = lambda request: Answer(status=401, body=b"unauthorized", content_type="text/plain")
    error = refused(client, device, "answered 401")
    assert "device's certificate" in error.hint


def test_truncated_body(client, device, server, sleeps):
    server.answer = lambda request: certs_answer([device.cert], cut_after=100)
    error = refused(client, device, "EST simplereenroll: .*broke off after 100 of \\d+ body bytes")
    assert "cut off" in error.hint
    assert len(server.requests) == 5 and len(sleeps) == 4


def test_oversized_body(client, device, server):
    server.answer = lambda request: Answer(body=b"A" * (2 << 20))
    refused(client, device, "more than the 1048576-byte limit")


def test_oversized_body_without_length(client, device, server):
    server.answer = lambda request: Answer(body=b"A" * (2 << 20), declared_length=-1)
    refused(client, device, "exceeds the 1048576-byte limit")


def test_connection_reset_mid_body(client, device, server):
    server.answer = lambda request: Answer(body=b64_lines(pkcs7_der([device.cert])), reset_after=200)
    refused(client, device, "EST simplereenroll: .*broke off after 200 of \\d+ body bytes")
    assert len(server.requests) == 5


def test_server_naming_another_host(factory, ca_file, device, tmp_path, sleeps):
    with FaultyEst.for_pki(factory, tmp_path / "wrong", names=("est.other.example",)) as wrong:
        client = est.EstClient(wrong.url, ca_file, device.files, sleep=sleeps)
        error = refused(client, device, "EST simplereenroll: TLS handshake with 127.0.0.1:.* failed")
        assert wrong.requests == [] and sleeps == []
    assert "name 127.0.0.1" in error.hint


def test_5xx_retried_then_succeeds(client, device, server, sleeps):
    pending_then_good(server, Answer(status=503, body=b"busy", content_type="text/plain"))
    key, issued = reenroll(client, device)
    assert len(issued) == 1 and len(sleeps) == 1
