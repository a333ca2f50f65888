"""`serve`: the EST server and the gateway on separate listeners."""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import resource
import signal
import ssl
import threading
import time

from . import pki
from .est import EstHandler
from .factory import Factory
from .gateway import GatewayHandler
from .httpbase import ConnectionLimits, ConnectionTable, TlsHttpServer, server_context
from .passwordguard import PasswordGuard
from .store import Store

log = logging.getLogger("certrotate_server")

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
SHUTDOWN_POLL_SECONDS = 0.05


class App:
    """What request handlers share: the factory, its store, what /cacerts serves."""

    def __init__(self, factory: Factory):
        self.factory = factory
        self.store = Store(factory.db_path)
        self.cacerts = pki.certs_only_pkcs7(factory.cacerts())
        self.cacerts_etag = f'"{hashlib.sha256(self.cacerts).hexdigest()}"'
        # Whose device certificates EST renews: the device CA, and during a rollover the old one.
        self.device_ca_subjects = {pki.load_cert(path).subject for path in factory.device_ca_files()}
        self.password_guard = PasswordGuard()
        factory.device_ca()  # fail at start, not on the first request


def _url_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0") else host


def _prepare_for_many_connections() -> None:
    """A thread and a socket per connected device: small thread stacks, all the fds allowed."""
    threading.stack_size(512 * 1024)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _reap(children: list[int], timeout: float = 10) -> None:
    """Wait for the workers told to stop; SIGKILL those still there after `timeout`."""
    deadline = time.monotonic() + timeout
    pending = set(children)
    while pending and time.monotonic() < deadline:
        pending = {pid for pid in pending if os.waitpid(pid, os.WNOHANG)[0] != pid}
        if pending:
            time.sleep(0.05)
    for pid in pending:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive the process that owns endpoints.json (even a SIGKILLed one)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def serve(factory: Factory, gateway_listen: tuple[str, int], est_listen: tuple[str, int], workers: int = 1,
          limits: ConnectionLimits = ConnectionLimits()) -> int:
    """Run both listeners in `workers` processes sharing the listening sockets
    (forked before any thread starts); the first process owns endpoints.json.
    `limits` hold in each process."""
    _prepare_for_many_connections()
    app = App(factory)
    connections = ConnectionTable(limits)
    device_cas = [str(path) for path in factory.device_ca_files()]
    gateway = TlsHttpServer(
        gateway_listen, GatewayHandler,
        server_context(factory.path("gateway.crt"), factory.path("gateway.key"), ssl.CERT_REQUIRED, device_cas),
        app, connections,
    )
    est = TlsHttpServer(
        est_listen, EstHandler,
        # EST judges a client certificate's validity itself: an expired one may still renew.
        server_context(factory.path("est.crt"), factory.path("est.key"), ssl.CERT_OPTIONAL, device_cas,
                       client_validity_checked=False),
        app, connections,
    )
    # Blocked here, inherited by every worker process and thread, and taken by
    # sigwait() in the main thread: a Python handler setting an Event can
    # deadlock on the Event's own lock when the signal lands inside Event.wait().
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    app.store.close()  # no SQLite connection may cross a fork
    parent = os.getpid()
    children = []
    for _ in range(workers - 1):
        pid = os.fork()
        if pid == 0:
            _die_with_parent(parent)
            children = None
            break
        children.append(pid)

    # shutdown() waits for a listener's next poll: poll often so SIGTERM stops it promptly.
    threads = [threading.Thread(target=s.serve_forever, args=(SHUTDOWN_POLL_SECONDS,), name=name, daemon=True)
               for name, s in (("gateway", gateway), ("est", est))]
    for t in threads:
        t.start()
    if children is not None:
        endpoints = {
            "gateway": f"https://{_url_host(gateway_listen[0])}:{gateway.port}",
            "est": f"https://{_url_host(est_listen[0])}:{est.port}/.well-known/est",
            "pid": parent,
        }
        # The sockets listen since the servers were built: clients can connect now.
        pki.write_public(factory.endpoints_path, (json.dumps(endpoints) + "\n").encode())
        log.info("gateway %s, EST %s (pid %d, %d worker processes)",
                 endpoints["gateway"], endpoints["est"], parent, workers)
    try:
        signal.sigwait(STOP_SIGNALS)
    finally:
        log.info("shutting down")
        for pid in children or ():
            os.kill(pid, signal.SIGTERM)
        for s in (gateway, est):
            s.shutdown()
            s.server_close()
        _reap(children or [])
        if children is not None:
            try:
                if json.loads(factory.endpoints_path.read_text()).get("pid") == parent:
                    factory.endpoints_path.unlink()
            except (FileNotFoundError, json.JSONDecodeError):
                pass
    return 0
