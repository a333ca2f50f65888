"""Clients that hold connections: a total deadline for a request's headers and for
its body (the per-read timeout alone lets a byte now and then hold a request for
ever), caps on open connections, and accept() backed off when descriptors run out."""

import socket
import time
from pathlib import Path

import pytest

from backend import Backend
from srvhelpers import RawTls

pytestmark = [pytest.mark.timeout(120), pytest.mark.bad_input("connection hoarding")]


def _threads(pid: int) -> int:
    return int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("Threads:")))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s


def _started(tmp_path, *serve_args, prefix=()) -> Backend:
    backend = Backend(tmp_path / "factory")
    return backend.start(0, 0, 1, *serve_args, prefix=prefix)


def _dripped_until_closed(conn: RawTls, data: bytes, limit: float) -> float:
    """Send `data` a byte every 0.5 s; seconds until the server closes the connection."""
    start = time.monotonic()
    for byte in data:
        try:
            conn.sock.sendall(bytes([byte]))
        except OSError:
            return time.monotonic() - start
        if time.monotonic() - start > limit:
            return float("inf")
        time.sleep(0.5)
    return time.monotonic() - start if conn.closed_by_server() else float("inf")


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_a_dripping_client_is_cut_off_at_the_deadline(tmp_path, phase):
    backend = _started(tmp_path, "--headers-deadline", "3", "--body-deadline", "3")
    try:
        conn = RawTls(backend.est_url, backend.root_ca, timeout=20)  # EST: no client certificate needed
        headers = b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n"
        if phase == "body":
            conn.send(headers)
        drip = (headers if phase == "headers" else b"") + b"A" * 40
        held = _dripped_until_closed(conn, drip, limit=12)
        conn.close()
        print(f"{phase}: held {held:.1f} s")
        # Old: still open after 12 s (each byte restarts the 30 s read timeout).
        assert held < 6, f"the connection was held {held:.1f} s with a deadline of 3 s"
        assert "not done in time" in backend.log
    finally:
        backend.stop()


def test_connections_over_the_caps_are_refused(tmp_path):
    backend = _started(tmp_path, "--max-connections", "12", "--max-connections-per-address", "4")
    port = int(backend.est_url.split(":")[2].split("/")[0])
    held = []

    def connect(source: str) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        held.append(sock)
        return sock

    def refused(sock: socket.socket) -> bool:
        sock.settimeout(2)
        try:
            return sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False  # still open, waiting for our handshake

    try:
        baseline = _threads(backend.proc.pid)
        same = [connect("127.0.0.1") for _ in range(4)]
        time.sleep(0.3)
        assert refused(connect("127.0.0.1")), "a 5th connection from one address was kept"
        assert not refused(same[0])
        others = [connect(f"127.0.0.{n}") for n in range(2, 10)]  # 12 in all now
        time.sleep(0.3)
        assert not any(refused(s) for s in others[:2])
        assert refused(connect("127.0.0.20")), "a 13th connection was kept"
        assert _threads(backend.proc.pid) <= baseline + 12
        # The EST server still serves, once a slot is free.
        for sock in held:
            sock.close()
        time.sleep(0.5)
        assert RawTls(backend.est_url, backend.root_ca).send(
            b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: x\r\n\r\n").reply()[0] == 200
    finally:
        for sock in held:
            sock.close()
        backend.stop()


def test_accept_errors_are_backed_off_not_spun_on(tmp_path):
    """With its descriptors used up, the listener must not spin on accept()."""
    backend = _started(tmp_path, "--max-connections", "10000", "--max-connections-per-address", "10000",
                       prefix=("prlimit", "--nofile=48:48", "--"))
    port = int(backend.est_url.split(":")[2].split("/")[0])
    held = []
    try:
        for _ in range(80):  # more than the server has descriptors for
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(1)
        before = _cpu_seconds(backend.proc.pid)
        time.sleep(3)
        busy = _cpu_seconds(backend.proc.pid) - before
        print(f"out of descriptors: {busy:.2f} s of CPU in 3 s")
        # Old: ~3 s of CPU in 3 s (a core spinning on EMFILE).
        assert busy < 0.6, f"the server used {busy:.2f} s of CPU in 3 s while out of descriptors"
        assert "accept() failed" in backend.log
    finally:
        for sock in held:
            sock.close()
        backend.stop()
