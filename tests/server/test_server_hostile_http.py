"""Hostile HTTP framing and bodies against both listeners, over real TLS: one
request is one request, whatever the body, and bad input gets a 400, not a 500."""

import base64
import json

import pytest

from backend import device_identity
from srvhelpers import RawTls, est_body, http_request, make_csr, new_key
from cryptography import x509
from cryptography.x509.oid import NameOID

pytestmark = pytest.mark.timeout(120)
EST = "/.well-known/est"


@pytest.fixture
def device(backend, tmp_path):
    return backend.register("dev-1", tmp_path / "dev-1")


def gateway_conn(backend, device) -> RawTls:
    return RawTls(backend.gateway_url, backend.root_ca, device_identity(device))


def est_conn(backend) -> RawTls:
    return RawTls(backend.est_url, backend.root_ca)


def basic(backend) -> str:
    password = (backend.dir / "est-password").read_text().strip()
    return "Basic " + base64.b64encode(f"bootstrap:{password}".encode()).decode()


@pytest.mark.bad_input("body left on a keep-alive connection")
def test_401_then_retry_on_one_connection(backend):
    """RFC 7030 3.2.3's flow as `curl --anyauth` runs it: the body of the refused
    request must not be read as the next request."""
    csr = est_body(make_csr(new_key(), x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "anyauth-1")])))
    conn = est_conn(backend)
    try:
        pkcs10 = {"Content-Type": "application/pkcs10"}
        status, headers, _ = conn.send(http_request("POST", f"{EST}/simpleenroll", csr, pkcs10)).reply()
        assert status == 401 and "www-authenticate" in headers
        status, _, body = conn.send(http_request(
            "POST", f"{EST}/simpleenroll", csr, {**pkcs10, "Authorization": basic(backend)})).reply()
        assert status == 200, body
    finally:
        conn.close()


@pytest.mark.bad_input("body left on a keep-alive connection")
def test_a_refused_body_is_never_parsed_or_logged(backend, device):
    secret = "SECRET-db-password-7f3a"
    smuggled = http_request("GET", "/device")  # what an attacker hopes runs as a second request
    body = json.dumps({"files": [{"name": "db", "value": secret}]}).encode() + b"\r\n" + smuggled
    conn = gateway_conn(backend, device)
    try:
        conn.send(http_request("PATCH", "/no-such-endpoint", body, {"Content-Type": "application/json"}))
        assert conn.reply()[0] == 404
        conn.send(http_request("GET", "/device", b"ignored body of a GET"))
        status, _, reply = conn.reply()
        assert status == 200 and json.loads(reply)["name"] == "dev-1"
        conn.send(http_request("GET", "/device"))
        assert conn.reply()[0] == 200  # and no third, smuggled reply in between
    finally:
        conn.close()
    assert secret not in backend.log and "Bad request" not in backend.log


SMUGGLING = {
    "plus sign": {"Content-Length": "+2"},
    "underscore": {"Content-Length": "0_2"},
    "two lengths": {"Content-Length": "2\r\nContent-Length: 3"},
    "chunked and length": {"Content-Length": "2", "Transfer-Encoding": "chunked"},
    "chunked alone": {"Transfer-Encoding": "chunked"},
    "identity coding": {"Transfer-Encoding": "identity", "Content-Length": "2"},
    # Python's header parser stops at a malformed line and joins folded ones: the
    # length after them would go unseen and the body be read as the next request.
    "space before the colon": {"Content-Length ": "2"},
    "malformed line before the length": {"Foo bar\r\nContent-Length": "2"},
    "length folded into another header": {"X-Note": "1\r\n Content-Length: 2"},
}


@pytest.mark.bad_input("request smuggling framing")
@pytest.mark.parametrize("case", list(SMUGGLING))
def test_ambiguous_framing_is_400_and_closes(backend, device, case):
    conn = gateway_conn(backend, device)
    try:
        conn.send(http_request("POST", "/events", b"[]\r\n0\r\n\r\n", SMUGGLING[case]))
        status, headers, body = conn.reply()
        assert status == 400, body
        assert headers.get("connection") == "close"
        assert conn.closed_by_server()
    finally:
        conn.close()


@pytest.mark.bad_input("HTTP/0.9 request")
def test_http09_request_is_400_at_once(backend):
    conn = est_conn(backend)
    conn.sock.settimeout(5)  # the old server held such a connection for 30 s
    try:
        status, _, body = conn.send(b"GET /.well-known/est/cacerts\r\n").reply()
        assert status == 400 and b"HTTP/1.1" in body
        assert conn.closed_by_server()
    finally:
        conn.close()
    assert "Traceback" not in backend.log


JSON_BODIES = {
    "deeply nested": ("/events", b"[" * 100_000 + b"]" * 100_000),
    "integer beyond 64 bits": ("/events", json.dumps([{
        "id": "e1", "eventType": {"id": "x", "version": 2**70}, "event": {}}]).encode()),
    "lone surrogate in an event": ("/events", b'[{"id": "\\ud800", "eventType": {"id": "x"}, "event": {}}]'),
    "lone surrogate in a config value": (
        "/config", b'{"reason": "r", "files": [{"name": "a", "value": "\\udc00x"}]}'),
}


@pytest.mark.bad_input("unstorable JSON")
@pytest.mark.parametrize("case", list(JSON_BODIES))
def test_unstorable_json_is_400_not_500(backend, device, case):
    path, body = JSON_BODIES[case]
    method = "PATCH" if path == "/config" else "POST"
    conn = gateway_conn(backend, device)
    try:
        status, _, reply = conn.send(http_request(method, path, body, {"Content-Type": "application/json"})).reply()
        assert status == 400, reply
        conn.send(http_request("GET", "/device"))
        assert conn.reply()[0] == 200
    finally:
        conn.close()
    assert "Traceback" not in backend.log
