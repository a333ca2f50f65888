"""Measure EST re-enrollments per second, a new TLS connection per request.

    .venv/bin/python tests/server/measure_reenroll.py [--seconds 10] [--clients 4]

Starts a real server (tests/backend.py) in a temp dir, registers one device,
then client processes POST simplereenroll in a loop, each request on a fresh
TLS connection authenticated by the device certificate. Prints the figures;
asserts nothing (speed targets are measured, not tested).
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import os
import ssl
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from backend import Backend, device_identity  # noqa: E402
from srvhelpers import est_body, load_cert, new_key, renewal_csr  # noqa: E402


def client(url: str, root_ca: str, key: str, cert: str, body: bytes, deadline: float, out) -> None:
    ctx = ssl.create_default_context(cafile=root_ca)
    ctx.load_cert_chain(cert, key)
    parts = urlsplit(url)
    done = failed = 0
    while time.monotonic() < deadline:
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, context=ctx, timeout=30)
        try:
            conn.request("POST", parts.path + "/simplereenroll", body, {"Content-Type": "application/pkcs10"})
            reply = conn.getresponse()
            reply.read()
            if reply.status == 200:
                done += 1
            else:
                failed += 1
        except OSError:
            failed += 1
        finally:
            conn.close()
    out.put((done, failed))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its worker processes, from /proc."""
    pids = [pid] + [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    total = 0
    for p in pids:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1, help="server worker processes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        backend = Backend(Path(tmp) / "factory")
        backend.start(workers=args.workers)
        try:
            device = backend.register("bench-1", Path(tmp) / "dev")
            key, cert = device_identity(device)
            body = est_body(renewal_csr(load_cert(cert), new_key()))
            queue = multiprocessing.Queue()
            cpu_start = cpu_seconds(backend.proc.pid)
            reaped_start = os.times()
            start = time.monotonic()
            deadline = start + args.seconds
            procs = [multiprocessing.Process(target=client, args=(backend.est_url, str(backend.root_ca), str(key),
                                                                   str(cert), body, deadline, queue))
                     for _ in range(args.clients)]
            for p in procs:
                p.start()
            results = [queue.get() for _ in procs]
            elapsed = time.monotonic() - start
            server_cpu = cpu_seconds(backend.proc.pid) - cpu_start
            for p in procs:
                p.join()
            # The clients are the only children reaped meanwhile (the server still runs).
            reaped = os.times()
            client_cpu = (reaped.children_user - reaped_start.children_user
                          + reaped.children_system - reaped_start.children_system)
        finally:
            backend.stop()
    done = sum(r[0] for r in results)
    failed = sum(r[1] for r in results)
    print(f"re-enrollments: {done} in {elapsed:.1f} s = {done / elapsed:.0f}/s "
          f"({args.workers} server processes, {args.clients} client processes, new TLS connection each, "
          f"{failed} failed), "
          f"{multiprocessing.cpu_count()} CPUs shared by server and clients")
    if done:
        per_request = server_cpu / done * 1000
        print(f"server CPU: {server_cpu:.1f} s = {per_request:.2f} ms per re-enrollment "
              f"(one core fully given to the server would do ~{1000 / per_request:.0f}/s)")
        print(f"client CPU: {client_cpu:.1f} s = {client_cpu / done * 1000:.2f} ms per re-enrollment "
              "(the clients share the same CPUs, so they bound the rate too)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
