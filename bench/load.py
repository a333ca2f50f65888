"""Load on the backend: HTTPS requests over a new mutual-TLS connection each
(no keep-alive, no TLS session resumption), from threads spread over a few
client processes, each thread speaking for one device identity.

Blocking sockets in threads: the TLS handshake then runs inside OpenSSL with
the GIL released, about 1 ms of client CPU per request here, half of what
asyncio's memory-BIO TLS costs. That matters because on 2 cores the client
competes with the server for CPU."""

from __future__ import annotations

import multiprocessing
import resource
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from measure import cpu_seconds_of, percentile


@dataclass(frozen=True)
class DeviceFiles:
    """A device identity as files, as ssl.SSLContext.load_cert_chain wants them."""

    name: str
    key_path: str
    cert_path: str


@dataclass(frozen=True)
class Request:
    method: str
    url: str  # absolute https URL
    body: bytes = b""
    content_type: str = ""


@dataclass
class Response:
    status: int
    headers: dict
    body: bytes


def client_context(ca_path: str, device: DeviceFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_path)
    context.load_cert_chain(device.cert_path, device.key_path)
    return context


def https_request(context: ssl.SSLContext, request: Request, timeout: float = 30.0) -> Response:
    """One request on its own TLS connection, closed afterwards."""
    parts = urlsplit(request.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as raw:
        # As urllib3 (the agent's HTTP stack) and curl do: without it the request, written
        # right after the handshake, waits ~40 ms for the server's delayed ACK (Nagle).
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname=parts.hostname) as tls:
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            head = [
                f"{request.method} {target} HTTP/1.1",
                f"Host: {parts.netloc}",
                "Connection: close",
                f"Content-Length: {len(request.body)}",
            ]
            if request.content_type:
                head.append(f"Content-Type: {request.content_type}")
            tls.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + request.body)
            return _read_response(tls)


def _read_response(tls: ssl.SSLSocket) -> Response:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before the reply headers ({len(data)} bytes)")
        data += chunk
    raw_head, _, body = data.partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers["content-length"]) if "content-length" in headers else None
    while length is None or len(body) < length:
        chunk = tls.recv(65536)
        if not chunk:
            if length is None:
                break
            raise ConnectionError(f"connection closed after {len(body)} of {length} body bytes")
        body += chunk
    return Response(status, headers, body)


@dataclass
class Sample:
    latency_s: float
    ok: bool
    error: str = ""


@dataclass
class LevelResult:
    concurrency: int
    processes: int
    samples: list[Sample] = field(default_factory=list)
    elapsed_s: float = 0.0
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0

    def summary(self) -> dict:
        ok = sorted(s.latency_s for s in self.samples if s.ok)
        errors = [s.error for s in self.samples if not s.ok]
        result = {
            "concurrency": self.concurrency,
            "client_processes": self.processes,
            "requests": len(self.samples),
            "errors": len(errors),
            "elapsed_s": round(self.elapsed_s, 3),
            "per_s": round(len(ok) / self.elapsed_s, 1) if self.elapsed_s else 0.0,
            "client_cpu_s": round(self.client_cpu_s, 2),
            "server_cpu_s": round(self.server_cpu_s, 2),
        }
        if ok:
            result.update(
                p50_ms=round(percentile(ok, 0.50) * 1000, 1),
                p90_ms=round(percentile(ok, 0.90) * 1000, 1),
                p99_ms=round(percentile(ok, 0.99) * 1000, 1),
                server_cpu_ms_per_request=round(self.server_cpu_s / len(ok) * 1000, 2),
            )
        if errors:
            result["first_errors"] = sorted(set(errors))[:5]
        return result


def describe_failure(response: Response | None, exc: BaseException | None) -> str:
    if exc is not None:
        return f"{type(exc).__name__}: {exc}"[:200]
    return f"HTTP {response.status}: {response.body[:120]!r}"


TRANSPORT_ERRORS = (OSError, ssl.SSLError, ValueError)  # ConnectionError and timeouts are OSErrors


def _worker(context, requests: list[Request], deadline: float, samples: list[Sample]) -> None:
    index = 0
    while time.perf_counter() < deadline:
        request = requests[index % len(requests)]
        index += 1
        start = time.perf_counter()
        try:
            response = https_request(context, request)
        except TRANSPORT_ERRORS as exc:
            samples.append(Sample(time.perf_counter() - start, False, describe_failure(None, exc)))
            continue
        ok = 200 <= response.status < 300
        samples.append(Sample(time.perf_counter() - start, ok, "" if ok else describe_failure(response, None)))


def run_threads(target, argument_lists: list[tuple]) -> None:
    threads = [threading.Thread(target=target, args=arguments) for arguments in argument_lists]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _client_process(ca_path, jobs, duration_s, ready, go, results) -> None:
    """jobs: one (DeviceFiles, [Request, ...]) per thread this process runs."""
    contexts = {}
    for device, _ in jobs:
        if device.name not in contexts:
            contexts[device.name] = client_context(ca_path, device)
    ready.release()
    go.wait()
    cpu_before = process_cpu_s()
    samples: list[Sample] = []
    deadline = time.perf_counter() + duration_s
    run_threads(_worker, [(contexts[d.name], reqs, deadline, samples) for d, reqs in jobs])
    results.put((samples, process_cpu_s() - cpu_before))


def run_level(
    ca_path: str,
    jobs: list[tuple[DeviceFiles, list[Request]]],
    duration_s: float,
    server_pid: int,
    processes: int,
) -> LevelResult:
    """Run len(jobs) concurrent threads (the concurrency) for duration_s,
    spread over ``processes`` client processes."""
    processes = max(1, min(processes, len(jobs)))
    shares = [(ca_path, jobs[i::processes], duration_s) for i in range(processes)]
    return run_clients(_client_process, shares, len(jobs), server_pid, duration_s + 120)


def run_clients(target, shares: list[tuple], concurrency: int, server_pid: int, timeout_s: float) -> LevelResult:
    """One client process per share, running target(*share, ready, go,
    results): each gets ready (TLS contexts loaded), all start together on
    ``go``, each puts (samples, its CPU seconds) on ``results``. The server's
    CPU is read from /proc around the run."""
    ctx = multiprocessing.get_context("fork")
    ready, go, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*share, ready, go, results)) for share in shares]
    for proc in procs:
        proc.start()
    for _ in procs:
        if not ready.acquire(timeout=120):
            raise RuntimeError("a load client process did not get ready within 120 s")
    server_cpu_before = cpu_seconds_of(server_pid)
    start = time.perf_counter()
    go.set()
    level = LevelResult(concurrency=concurrency, processes=len(procs))
    for _ in procs:
        samples, cpu = results.get(timeout=timeout_s)
        level.samples.extend(samples)
        level.client_cpu_s += cpu
    level.elapsed_s = time.perf_counter() - start
    level.server_cpu_s = cpu_seconds_of(server_pid) - server_cpu_before
    for proc in procs:
        proc.join()
    return level
