"""`serve`: the EST server and the gateway on separate listeners."""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import ssl
import threading

from . import pki
from .est import EstHandler
from .factory import Factory
from .gateway import GatewayHandler
from .httpbase import TlsHttpServer, server_context
from .store import Store

log = logging.getLogger("certrotate_server")


class App:
    """What request handlers share: the factory, its store, its root certificate."""

    def __init__(self, factory: Factory):
        self.factory = factory
        self.store = Store(factory.db_path)
        self.root_cert = factory.root_cert()
        factory.device_ca()  # fail at start, not on the first request


def _url_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0") else host


def _prepare_for_many_connections() -> None:
    """A thread and a socket per connected device: small thread stacks, all the fds allowed."""
    threading.stack_size(512 * 1024)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(factory: Factory, gateway_listen: tuple[str, int], est_listen: tuple[str, int]) -> int:
    _prepare_for_many_connections()
    app = App(factory)
    device_ca = str(factory.path("device-ca.crt"))
    gateway = TlsHttpServer(
        gateway_listen, GatewayHandler,
        server_context(factory.path("gateway.crt"), factory.path("gateway.key"), ssl.CERT_REQUIRED, [device_ca]),
        app,
    )
    est = TlsHttpServer(
        est_listen, EstHandler,
        server_context(factory.path("est.crt"), factory.path("est.key"), ssl.CERT_OPTIONAL, [device_ca]),
        app,
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    threads = [threading.Thread(target=s.serve_forever, name=name, daemon=True)
               for name, s in (("gateway", gateway), ("est", est))]
    for t in threads:
        t.start()
    endpoints = {
        "gateway": f"https://{_url_host(gateway_listen[0])}:{gateway.port}",
        "est": f"https://{_url_host(est_listen[0])}:{est.port}/.well-known/est",
        "pid": os.getpid(),
    }
    # The sockets listen since the servers were built: clients can connect now.
    pki.write_public(factory.endpoints_path, (json.dumps(endpoints) + "\n").encode())
    log.info("gateway %s, EST %s (pid %d)", endpoints["gateway"], endpoints["est"], os.getpid())
    try:
        while not stop.wait(0.2):
            pass
    finally:
        log.info("shutting down")
        for s in (gateway, est):
            s.shutdown()
            s.server_close()
        try:
            if json.loads(factory.endpoints_path.read_text()).get("pid") == os.getpid():
                factory.endpoints_path.unlink()
        except (FileNotFoundError, json.JSONDecodeError):
            pass
    return 0
