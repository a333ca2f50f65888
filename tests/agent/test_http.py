"""certrotate.http against real TLS servers on 127.0.0.1 (tests/estfaults.py)."""

from __future__ import annotations

import socket
import time

import pytest
import requests

from certrotate import crashpoints, http
from certrotate.deadline import Deadline
from estfaults import Answer, FaultyEst, Sleeps, ca_file, factory, server  # noqa: F401 (fixtures)
from pki import TestPki, key_pem, write_file

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def session(ca_file):
    return http.make_session(ca_file)


def text_answer(status: int, text: str) -> Answer:
    return Answer(status=status, body=text.encode(), content_type="text/plain")


def test_reply_carries_status_headers_and_body(server, session):
    server.answer = lambda request: Answer(status=201, body=b'{"a": 1}', content_type="Application/JSON")
    reply = http.send(session, "POST", server.url + "/x", point="t", data=b"hello")
    assert reply.status == 201
    assert reply.headers["content-type"] == "Application/JSON"
    assert reply.body == b'{"a": 1}'
    assert reply.json() == {"a": 1}
    assert server.requests[0].body == b"hello"


def test_client_certificate_is_presented(factory, server, ca_file, tmp_path):
    device = factory.device()
    cert = write_file(tmp_path / "client.pem", factory.device_chain_pem(device), 0o644)
    key = write_file(tmp_path / "pkey.pem", key_pem(device.key), 0o600)
    session = http.make_session(ca_file, (str(cert), str(key)))
    http.send(session, "GET", server.url + "/cacerts", point="t")
    assert server.requests[0].client_cert == device.cert


def test_server_from_another_root_is_refused_without_retry(server, tmp_path):
    other_root = write_file(tmp_path / "other.crt", TestPki("other").root.pem, 0o644)
    sleeps = Sleeps()
    with pytest.raises(http.TransportError) as caught:
        http.send(http.make_session(str(other_root)), "GET", server.url, point="t", sleep=sleeps)
    assert "TLS handshake with 127.0.0.1" in str(caught.value)
    assert "trust anchor" in caught.value.hint
    assert sleeps == [] and server.requests == []


def test_server_naming_another_host_is_refused(factory, session, tmp_path):
    with FaultyEst.for_pki(factory, tmp_path / "wrong-name", names=("est.example.com",)) as wrong:
        with pytest.raises(http.TransportError) as caught:
            http.send(session, "GET", wrong.url, point="t", sleep=Sleeps())
        assert wrong.requests == []
    assert "127.0.0.1" in str(caught.value)
    assert "name 127.0.0.1" in caught.value.hint


def test_verification_cannot_be_switched_off(server, tmp_path, monkeypatch, factory):
    # A session trusting another root stays so, whatever the caller or the
    # environment ask for.
    other_root = write_file(tmp_path / "other.crt", TestPki("other").root.pem, 0o644)
    good_root = write_file(tmp_path / "good.crt", factory.root.pem, 0o644)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(good_root))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(good_root))
    session = http.make_session(str(other_root))
    with pytest.raises(requests.exceptions.SSLError):
        session.get(server.url, verify=False, timeout=10)
    with pytest.raises(http.TransportError):
        http.send(session, "GET", server.url, point="t", sleep=Sleeps())


def test_5xx_is_retried_with_growing_capped_jittered_waits(server, session):
    answers = iter([text_answer(503, "busy")] * 3 + [text_answer(200, "ok")])
    server.answer = lambda request: next(answers)
    sleeps = Sleeps()
    reply = http.send(session, "GET", server.url, point="t", sleep=sleeps)
    assert reply.status == 200 and reply.body == b"ok"
    assert len(server.requests) == 4
    for attempt, wait in enumerate(sleeps, start=1):
        ceiling = min(http.BACKOFF_CAP, http.BACKOFF_BASE * 2 ** (attempt - 1))
        assert ceiling / 2 <= wait <= ceiling


def test_backoff_is_capped():
    assert all(http.backoff_delay(n) <= http.BACKOFF_CAP for n in range(1, 40))
    assert http.backoff_delay(30) >= http.BACKOFF_CAP / 2


def test_persistent_5xx_gives_status_and_first_line(server, session):
    server.answer = lambda request: text_answer(502, "\n  upstream EST CA down\nmore")
    with pytest.raises(http.TransportError) as caught:
        http.send(session, "GET", server.url, point="t", attempts=3, sleep=Sleeps())
    assert caught.value.status == 502
    assert "upstream EST CA down" in str(caught.value)
    assert "gave up after 3 attempts" in str(caught.value)
    assert len(server.requests) == 3


def test_4xx_is_returned_not_retried(server, session):
    server.answer = lambda request: text_answer(403, "forbidden")
    reply = http.send(session, "GET", server.url, point="t", sleep=Sleeps())
    assert reply.status == 403 and reply.first_line() == "forbidden"
    assert len(server.requests) == 1


def test_connection_refused_is_retried_then_explained(session):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleeps = Sleeps()
    with pytest.raises(http.TransportError) as caught:
        http.send(session, "GET", f"https://127.0.0.1:{port}/x", point="t", attempts=3, sleep=sleeps)
    assert f"cannot connect to 127.0.0.1:{port}" in str(caught.value)
    assert "running" in caught.value.hint
    assert len(sleeps) == 2


def test_timeout_is_retried_then_explained(server, session):
    def slow(request):
        time.sleep(1.0)
        return text_answer(200, "late")

    server.answer = slow
    sleeps = Sleeps()
    with pytest.raises(http.TransportError) as caught:
        http.send(session, "GET", server.url, point="t", timeout=0.3, attempts=2, sleep=sleeps)
    assert "timed out after 0.3 s" in str(caught.value)
    # Counted on the client: on a slow (emulated) target the handshake alone can
    # take the 0.3 s, so the server may never see a request.
    assert len(sleeps) == 1


def test_declared_oversized_body_is_refused_unread(server, session):
    server.answer = lambda request: Answer(body=b"x" * 4096)
    with pytest.raises(http.TransportError) as caught:
        http.send(session, "GET", server.url, point="t", max_body=1024, sleep=Sleeps())
    assert "announces 4096 bytes, more than the 1024-byte limit" in str(caught.value)
    assert len(server.requests) == 1


def test_undeclared_oversized_body_stops_at_the_limit(server, session):
    server.answer = lambda request: Answer(body=b"x" * (3 << 20), declared_length=-1)
    with pytest.raises(http.TransportError) as caught:
        http.send(session, "GET", server.url, point="t", sleep=Sleeps())
    assert f"exceeds the {1 << 20}-byte limit" in str(caught.value)


def test_body_without_length_is_read_to_the_end(server, session):
    server.answer = lambda request: Answer(body=b"y" * 200_000, declared_length=-1)
    reply = http.send(session, "GET", server.url, point="t")
    assert reply.body == b"y" * 200_000


def test_truncated_body_is_retried_then_explained(server, session):
    server.answer = lambda request: Answer(body=b"z" * 1000, declared_length=1000, cut_after=400)
    sleeps = Sleeps()
    with pytest.raises(http.TransportError) as caught:
        http.send(session, "GET", server.url, point="t", attempts=2, sleep=sleeps)
    assert "broke off after 400 of 1000 body bytes" in str(caught.value)
    assert "cut off" in caught.value.hint
    assert len(server.requests) == 2 and len(sleeps) == 1


def test_truncation_then_success(server, session):
    answers = iter([Answer(body=b"z" * 1000, cut_after=10), Answer(body=b"z" * 1000)])
    server.answer = lambda request: next(answers)
    assert http.send(session, "GET", server.url, point="t", sleep=Sleeps()).body == b"z" * 1000


def test_reset_mid_body_is_retried_then_explained(server, session):
    server.answer = lambda request: Answer(body=b"r" * 5000, reset_after=1000)
    with pytest.raises(http.TransportError) as caught:
        http.send(session, "GET", server.url, point="t", attempts=2, sleep=Sleeps())
    # TLS stacks report a reset mid-record as a reset or as an early end.
    assert "broke off after 1000 of 5000 body bytes" in str(caught.value)
    assert len(server.requests) == 2


def test_non_json_reply_is_explained(server, session):
    server.answer = lambda request: Answer(body=b"<html>oops</html>", content_type="text/html")
    reply = http.send(session, "GET", server.url, point="t")
    with pytest.raises(http.TransportError) as caught:
        reply.json()
    assert "not JSON" in str(caught.value) and "<html>oops</html>" in str(caught.value)


def test_crash_points_mark_send_and_reply(server, session, tmp_path, monkeypatch):
    trace = tmp_path / "trace"
    monkeypatch.setattr(crashpoints, "_trace", str(trace))
    answers = iter([text_answer(500, "x"), text_answer(200, "ok")])
    server.answer = lambda request: next(answers)
    http.send(session, "GET", server.url, point="est:cacerts", sleep=Sleeps())
    assert trace.read_text().splitlines() == ["est:cacerts:send", "est:cacerts:reply"]


@pytest.mark.bad_input("EST reply dribbled a byte at a time")
def test_dribbled_reply_ends_at_the_request_deadline_unretried(server, session):
    server.answer = lambda request: Answer(body=b"d" * 200, content_type="text/plain", drip=0.2)
    started = time.monotonic()
    with pytest.raises(http.TransportError) as caught:
        http.send(session, "GET", server.url, point="t", reply_within=1.0, sleep=Sleeps())
    assert time.monotonic() - started < 3
    assert "the whole reply did not arrive within 1 s" in str(caught.value)
    assert "127.0.0.1" in caught.value.hint
    # Another attempt would hold the agent (and its lock) for another deadline.
    assert len(server.requests) == 1


@pytest.mark.bad_input("EST reply dribbled a byte at a time")
def test_deadlines_run_on_the_clock_passed_in(server, session):
    # A clock 20 times faster than real time: a 20 s deadline passes in one real second.
    server.answer = lambda request: Answer(body=b"d" * 200, content_type="text/plain", drip=0.2)
    fast = lambda: time.monotonic() * 20  # noqa: E731
    started = time.monotonic()
    with pytest.raises(http.TransportError, match="the whole reply did not arrive within 20 s"):
        http.send(session, "GET", server.url, point="t", reply_within=20.0, run=Deadline(None, fast))
    assert time.monotonic() - started < 3
    # A run whose deadline has passed sends nothing more.
    now = [0.0]
    run = Deadline(10, lambda: now[0])
    now[0] = 10.5
    with pytest.raises(http.TransportError, match="the run's 10 s deadline passed"):
        http.send(session, "GET", server.url, point="t", run=run)
    assert len(server.requests) == 1


@pytest.mark.bad_input("plain-http EST URL")
def test_plain_http_is_refused_unsent(session):
    with pytest.raises(http.TransportError, match="not https") as caught:
        http.send(session, "POST", "http://127.0.0.1:1/.well-known/est/simplereenroll", point="t",
                  data=b"csr", sleep=Sleeps())
    assert "https://" in caught.value.hint
