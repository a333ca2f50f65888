"""Connection threads of the HTTPS listeners: reused, yet one per concurrent connection."""

from __future__ import annotations

import http.client
import itertools
import json
import ssl
import threading
import time

import pytest

from certrotate_server import httpbase
from certrotate_server.httpbase import BaseHandler, ConnectionLimits, ConnectionTable, TlsHttpServer, server_context
from pki import TestPki, cert_pem, key_pem, write_file

pytestmark = pytest.mark.timeout(60)


class ThreadIdHandler(BaseHandler):
    """Answers with a number naming the thread that serves the connection (thread
    idents are reused by new threads, so numbers are handed out per thread); /hold
    waits for the test's signal first, so connections can be held open at once."""

    release = threading.Event()
    held = threading.Semaphore(0)
    numbers = itertools.count()
    per_thread = threading.local()

    def route(self, method, path):
        if path == "/hold":
            self.held.release()
            self.release.wait(30)
        if not hasattr(self.per_thread, "number"):
            self.per_thread.number = next(self.numbers)
        self.send_json(200, {"thread": self.per_thread.number})


@pytest.fixture
def server(tmp_path):
    pki = TestPki()
    identity = pki.server()
    cert = write_file(tmp_path / "server.crt", cert_pem(identity.cert), 0o644)
    key = write_file(tmp_path / "server.key", key_pem(identity.key), 0o600)
    root = write_file(tmp_path / "root.crt", pki.root.pem, 0o644)
    srv = TlsHttpServer(("127.0.0.1", 0), ThreadIdHandler, server_context(cert, key, ssl.CERT_NONE), app=None,
                        connections=ConnectionTable(ConnectionLimits()))
    loop = threading.Thread(target=srv.serve_forever, daemon=True)
    loop.start()
    srv.client_context = ssl.create_default_context(cafile=str(root))
    try:
        yield srv
    finally:
        ThreadIdHandler.release.set()
        srv.shutdown()
        srv.server_close()
        ThreadIdHandler.release.clear()


def get(server, path="/"):
    """One request on a new TLS connection; the serving thread's id."""
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=server.client_context, timeout=30)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        reply = conn.getresponse()
        assert reply.status == 200
        return json.loads(reply.read())["thread"]
    finally:
        conn.close()


def test_sequential_connections_reuse_threads(server):
    threads = {get(server) for _ in range(30)}
    # A thread per connection would give 30; a reused one gives 1, or a few when the
    # next connection arrives before the previous thread is back waiting.
    assert len(threads) <= 5, threads


def test_concurrent_connections_each_get_a_thread(server):
    results = []
    holders = [threading.Thread(target=lambda: results.append(get(server, "/hold"))) for _ in range(6)]
    for holder in holders:
        holder.start()
    for _ in holders:
        assert ThreadIdHandler.held.acquire(timeout=30), "a held connection never reached its handler"
    # Six connections are held open at once; a seventh is still served at once.
    seventh = get(server)
    ThreadIdHandler.release.set()
    for holder in holders:
        holder.join(30)
    assert len(set(results)) == 6 and seventh not in results


def test_idle_threads_end(server, monkeypatch):
    monkeypatch.setattr(httpbase, "IDLE_THREAD_SECONDS", 0.2)
    before = set(threading.enumerate())
    get(server)
    started = set(threading.enumerate()) - before
    assert started, "the connection was not served by a new thread"
    deadline = time.monotonic() + 10
    while any(thread.is_alive() for thread in started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(thread.is_alive() for thread in started)
    assert server._waiting == 0


def test_listener_with_nothing_to_accept_does_not_block(server):
    """Worker processes share the listening socket; one that loses the race for a
    connection must come back from accept(), or shutdown() waits for it forever."""
    with pytest.raises(BlockingIOError):
        server.get_request()
