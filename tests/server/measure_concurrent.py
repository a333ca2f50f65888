"""Many devices at once: N TLS connections opened together, then N re-enrollments sent at once.

    .venv/bin/python tests/server/measure_concurrent.py [--devices 2000]

Starts a real server (tests/backend.py) in a temp dir. One asyncio client holds
N client-authenticated TLS connections to the EST server open, then sends a
simplereenroll on every one at the same moment. Prints the reply statuses, the
time, and whether the server logged any error; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from backend import Backend, device_identity  # noqa: E402
from srvhelpers import est_body, load_cert, new_key, renewal_csr  # noqa: E402


async def run(url: str, ctx: ssl.SSLContext, request: bytes, count: int) -> tuple[Counter, float, float]:
    go = asyncio.Event()
    parts = urlsplit(url)
    ready = 0

    async def device() -> bytes:
        nonlocal ready
        try:
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port, ssl=ctx)
        finally:
            ready += 1
        await go.wait()
        writer.write(request)
        await writer.drain()
        reply = await reader.read()
        writer.close()
        return reply.split(b" ", 2)[1]

    start = time.monotonic()
    tasks = [asyncio.create_task(device()) for _ in range(count)]
    # Every handshake done (or failed) before the burst; the server drops idle connections after 30 s.
    while ready < count:
        await asyncio.sleep(0.1)
    connected = time.monotonic() - start
    go.set()
    burst = time.monotonic()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    statuses = Counter(r.decode() if isinstance(r, bytes) else type(r).__name__ for r in results)
    return statuses, connected, time.monotonic() - burst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        backend = Backend(Path(tmp) / "factory")
        backend.start()
        try:
            key, cert = device_identity(backend.register("many-1", Path(tmp) / "dev"))
            body = est_body(renewal_csr(load_cert(cert), new_key()))
            path = urlsplit(backend.est_url).path
            request = (f"POST {path}/simplereenroll HTTP/1.1\r\nHost: est\r\nContent-Type: application/pkcs10\r\n"
                       f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
            ctx = ssl.create_default_context(cafile=str(backend.root_ca))
            ctx.load_cert_chain(str(cert), str(key))
            statuses, connected, burst = asyncio.run(run(backend.est_url, ctx, request, args.devices))
        finally:
            backend.stop()
        errors = sum(1 for line in backend.log.splitlines() if "Traceback" in line or " 500 " in line)
    print(f"{args.devices} connections open after {connected:.1f} s; burst answered in {burst:.1f} s; "
          f"replies {dict(statuses)}; server errors logged: {errors}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
