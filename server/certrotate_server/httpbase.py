"""Threaded HTTPS server shared by the EST server and the gateway.

The TLS handshake runs in the connection's worker thread (not in accept()), so
one slow or hostile client cannot stall the listener, and handshakes of many
devices proceed in parallel (OpenSSL releases the GIL).
"""

from __future__ import annotations

import errno
import json
import logging
import queue
import re
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509

log = logging.getLogger("certrotate_server")

# A read that gets nothing for this long ends the connection.
SOCKET_TIMEOUT = 30
# accept() failing for want of file descriptors or memory: wait this long, doubling up to the cap.
ACCEPT_BACKOFF = (0.05, 1.0)
ACCEPT_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# How often overdue connections are looked for.
DEADLINE_SCAN_SECONDS = 0.25
# A connection thread with no next connection for this long ends.
IDLE_THREAD_SECONDS = 60
# Oversized bodies up to this much beyond the limit are read and dropped before the 413.
DRAIN_LIMIT = 4 * 1024 * 1024
# Content-Length is digits only: int() would also take "+91", " 91" and "9_1".
CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
# JSON integers are stored in SQLite, which holds 64 bits.
JSON_INT_RANGE = range(-(2**63), 2**63)
# OpenSSL's X509_V_FLAG_NO_CHECK_TIME (the ssl module has no name for it).
VERIFY_NO_CHECK_TIME = 0x200000


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class ConnectionLimits:
    """What one process lets clients hold. The per-read timeout alone lets a client
    that sends a byte now and then hold a request, and its thread, for ever."""

    max_connections: int = 2048  # both listeners together
    max_per_address: int = 256  # devices behind one NAT share an address
    headers_deadline: float = 30.0  # from the handshake, or the previous reply, to the end of the headers
    body_deadline: float = 60.0  # from the end of the headers to the end of the reply


class ConnectionTable:
    """The open connections of this process: counted per client address, each with a
    deadline; an overdue one is shut down under the thread that reads it."""

    def __init__(self, limits: ConnectionLimits, clock=time.monotonic):
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._per_address: Counter[str] = Counter()
        self._total = 0
        self._deadlines: dict[socket.socket, tuple[float, str]] = {}
        self._next_scan = 0.0
        self._refused = 0

    def admit(self, address: str) -> bool:
        with self._lock:
            if self._total >= self.limits.max_connections or self._per_address[address] >= self.limits.max_per_address:
                self._refused += 1
                return False
            self._per_address[address] += 1
            self._total += 1
            return True

    def release(self, conn: socket.socket, address: str) -> None:
        with self._lock:
            self._deadlines.pop(conn, None)
            self._per_address[address] -= 1
            self._total -= 1
            if self._per_address[address] <= 0:
                del self._per_address[address]

    def set_deadline(self, conn: socket.socket, seconds: float, what: str) -> None:
        with self._lock:
            self._deadlines[conn] = (self._clock() + seconds, what)

    def expire(self) -> None:
        """Shut down the overdue connections; called often by the listeners' loops."""
        now = self._clock()
        if now < self._next_scan:
            return
        with self._lock:
            self._next_scan = now + DEADLINE_SCAN_SECONDS
            overdue = [(conn, what) for conn, (deadline, what) in self._deadlines.items() if deadline <= now]
            for conn, _ in overdue:
                del self._deadlines[conn]
            refused, self._refused = self._refused, 0
        if refused:
            log.warning("refused %d connections over the limits (%d in all, %d per address)",
                        refused, self.limits.max_connections, self.limits.max_per_address)
        for conn, what in overdue:
            log.info("%s connection closed: %s not done in time", _peer(conn), what)
            try:
                # The plain socket's shutdown: the reading thread's TLS read then ends.
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
            except OSError:
                pass


def _peer(conn: socket.socket) -> str:
    try:
        return conn.getpeername()[0]
    except OSError:
        return "-"


class TlsHttpServer(ThreadingHTTPServer):
    """A thread per connection, as many as there are connections; threads are reused.

    Starting a thread costs more CPU than a re-enrollment's own Python code, so a
    thread that has served its connection waits up to IDLE_THREAD_SECONDS for the
    next one; a new thread starts only when none is waiting.
    """

    daemon_threads = True
    request_queue_size = 4096
    allow_reuse_address = True

    def __init__(self, address, handler_class, context: ssl.SSLContext, app, connections: ConnectionTable):
        self.app = app
        self.connections = connections
        self._accept_backoff = ACCEPT_BACKOFF[0]
        self._handoff: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting = 0  # threads waiting on _handoff and not yet given a connection
        self._waiting_lock = threading.Lock()
        super().__init__(address, handler_class)
        self.socket = context.wrap_socket(
            self.socket, server_side=True, do_handshake_on_connect=False
        )
        # Worker processes share this socket and all wake for each connection: the
        # losers must get an error from accept() (socketserver ignores it), not block
        # in it, where shutdown() would wait for them until the next connection.
        self.socket.setblocking(False)

    def process_request(self, request, client_address):
        with self._waiting_lock:
            if self._waiting:
                self._waiting -= 1
                self._handoff.put((request, client_address))
                return
        try:
            threading.Thread(target=self._serve_connections, args=(request, client_address),
                             daemon=True).start()
        except BaseException:  # no thread (a pids limit): socketserver closes the connection
            self.connections.release(request, client_address[0])
            raise

    def verify_request(self, request, client_address) -> bool:
        return self.connections.admit(client_address[0])  # refused: closed at once

    def service_actions(self):
        self.connections.expire()

    def _serve_connections(self, request, client_address):
        while True:
            try:
                self.process_request_thread(request, client_address)
            finally:
                self.connections.release(request, client_address[0])
            with self._waiting_lock:
                self._waiting += 1
            try:
                request, client_address = self._handoff.get(timeout=IDLE_THREAD_SECONDS)
            except queue.Empty:
                with self._waiting_lock:
                    # A connection handed off just as the wait ended is still ours.
                    try:
                        request, client_address = self._handoff.get_nowait()
                    except queue.Empty:
                        self._waiting -= 1
                        return

    def get_request(self):
        try:
            conn, addr = self.socket.accept()
        except OSError as err:
            if err.errno in ACCEPT_OUT_OF_RESOURCES:
                # The connection stays queued and the socket readable: without a
                # pause the loop would spin at full CPU until descriptors free up.
                log.warning("accept() failed: %s; waiting %.2f s", err, self._accept_backoff)
                time.sleep(self._accept_backoff)
                self._accept_backoff = min(ACCEPT_BACKOFF[1], 2 * self._accept_backoff)
            raise
        self._accept_backoff = ACCEPT_BACKOFF[0]
        conn.settimeout(SOCKET_TIMEOUT)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, addr

    def handle_error(self, request, client_address):
        log.warning("connection from %s failed", client_address[0], exc_info=True)

    @property
    def port(self) -> int:
        return self.server_address[1]


class BaseHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "certrotate-server"
    sys_version = ""
    max_body = 1024 * 1024
    routes: dict = {}

    def setup(self):
        self._deadline("the TLS handshake and the request headers", self.server.connections.limits.headers_deadline)
        try:
            self.request.do_handshake()
        except (ssl.SSLError, OSError) as err:
            # A refused client certificate or a client that hung up: no HTTP exchange.
            log.info("%s tls handshake failed: %s", self.client_address[0], err)
            self.handshake_ok = False
        else:
            self.handshake_ok = True
        super().setup()

    def handle(self):
        if not self.handshake_ok:
            return
        try:
            super().handle()
        except (ssl.SSLError, ConnectionError, TimeoutError) as err:
            # Clients that hang up without close_notify, or idle past the timeout.
            log.debug("%s connection ended: %s", self.client_address[0], err)

    def _deadline(self, what: str, seconds: float) -> None:
        self.server.connections.set_deadline(self.request, seconds, what)

    def finish(self):
        try:
            super().finish()
        except (ssl.SSLError, OSError):
            pass

    # Dispatch ---------------------------------------------------------------
    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def parse_request(self) -> bool:
        """The request line and headers, and the body's framing: exactly one
        Content-Length of plain digits, or none; never Transfer-Encoding. A request
        framed any other way could be read differently by a proxy in front."""
        self._body = None
        self.content_length = None
        self.identity = "-"
        self.started = time.monotonic()
        if len(self.raw_requestline.split()) == 2:
            # HTTP/0.9 has no headers: refuse it before waiting for them.
            self.request_version, self.close_connection = "HTTP/1.0", True
            self.command, self.path = None, "-"
            self.send_error_body(400, "HTTP/0.9 requests are not served; send HTTP/1.1")
            return False
        if not super().parse_request():
            return False
        self._deadline("the request body and the reply", self.server.connections.limits.body_deadline)
        lengths = self.headers.get_all("Content-Length") or []
        if self.headers.defects or any("\r" in v or "\n" in v for v in self.headers.values()):
            # The parser stops at a malformed line ("Content-Length : 5") and joins folded
            # ones: the headers after it, the length among them, would go unseen.
            problem = "a malformed or folded header line; send one \"Name: value\" per line"
        elif "Transfer-Encoding" in self.headers:
            problem = "Transfer-Encoding is not accepted; send the body with one Content-Length"
        elif len(lengths) > 1:
            problem = "more than one Content-Length header; send one"
        elif lengths and not CONTENT_LENGTH.fullmatch(lengths[0]):
            problem = f"Content-Length {lengths[0][:20]!r} is not a decimal number of bytes"
        else:
            self.content_length = int(lengths[0]) if lengths else None
            return True
        self.close_connection = True
        self.send_error_body(400, problem)
        return False

    def _dispatch(self, method: str):
        try:
            try:
                self.route(method, self.path.split("?", 1)[0])
            finally:
                self._drain_unread_body()
        except HttpError as err:
            self.send_error_body(err.status, err.message, err.headers)
        except Exception:
            log.exception("internal error on %s %s", method, self.path)
            self.send_error_body(500, "internal server error; see the server log")

    def _drain_unread_body(self) -> None:
        """A body the handler did not read (a refusal, a body on a GET) is read away,
        or the connection closed: left there, it would be parsed as the next request."""
        if self._body is not None or not self.content_length:
            return
        self._body = b""
        if self.content_length > self.max_body + DRAIN_LIMIT:
            self.close_connection = True
        else:
            self._discard(self.content_length)

    def route(self, method: str, path: str):
        raise NotImplementedError

    # Requests ---------------------------------------------------------------
    def peer_cert(self) -> x509.Certificate | None:
        der = self.request.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der) if der else None

    def read_body(self) -> bytes:
        if self._body is not None:
            return self._body
        length = self.content_length
        if length is None:
            raise HttpError(411, "Content-Length header required")
        if length > self.max_body:
            self.close_connection = True
            # Read away (not kept): a client still sending when the connection
            # closes gets a reset instead of the 413 that explains why.
            self._drain_unread_body()
            raise HttpError(413, f"request body of {length} bytes exceeds the limit of {self.max_body}")
        self._body = self.rfile.read(length)
        if len(self._body) != length:
            self.close_connection = True
            raise HttpError(400, "request body shorter than Content-Length")
        return self._body

    def _discard(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, 65536))
            if not chunk:
                return
            length -= len(chunk)

    def read_json(self):
        """The body as JSON that can be stored: 64-bit integers, valid UTF-8 strings."""
        body = self.read_body()
        try:
            value = json.loads(body, parse_int=_stored_int)
            json.dumps(value, ensure_ascii=False).encode()  # lone surrogates ("\\ud800") fail here
        except RecursionError:
            raise HttpError(400, "request body is nested too deeply") from None
        except (UnicodeError, ValueError) as err:
            raise HttpError(400, f"request body is not valid JSON: {err}") from None
        return value

    # Responses --------------------------------------------------------------
    def send(self, status: int, body: bytes = b"", content_type: str | None = None, headers: dict | None = None):
        self.send_response_only(status)
        headers = dict(headers or {})
        self.send_header("Date", headers.pop("Date", None) or self.date_time_string())
        if content_type:
            self.send_header("Content-Type", content_type)
        for name, value in headers.items():
            self.send_header(name, str(value))
        if status not in (204, 304):  # RFC 9110: these carry no body and no length
            self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        # Headers and body in one write: two small writes stall ~40 ms on
        # Nagle + the client's delayed ACK.
        self._headers_buffer.append(b"\r\n" + (body if self.command != "HEAD" else b""))
        self.log_line(status, len(body))  # before the reply: logged once a client has it
        self.flush_headers()
        self._deadline("the next request's headers", self.server.connections.limits.headers_deadline)

    def send_json(self, status: int, obj, headers: dict | None = None):
        self.send(status, (json.dumps(obj, indent=None) + "\n").encode(), "application/json", headers)

    def send_error_body(self, status: int, message: str, headers: dict | None = None):
        """Error replies: plain text, what happened and what to do."""
        self.send(status, (message + "\n").encode(), "text/plain; charset=utf-8", headers)

    def log_line(self, status: int, size: int):
        elapsed = (time.monotonic() - getattr(self, "started", time.monotonic())) * 1000
        log.info(
            "%s %s %s %s %d %d %.1fms",
            self.client_address[0], self.identity, self.command, self.path, status, size, elapsed,
        )

    # BaseHTTPRequestHandler writes its own errors (bad request lines) through these.
    def log_message(self, format, *args):
        log.info("%s %s", self.client_address[0], format % args)

    def log_error(self, format, *args):
        # Its messages quote the raw request line, which may be anything a client
        # sent (a body with secrets): the status, or the exception, is enough.
        log.info("%s refused a malformed request: %s", self.client_address[0], args[0] if args else "")

    def log_request(self, code="-", size="-"):
        pass


def _stored_int(text: str) -> int:
    value = int(text)
    if value not in JSON_INT_RANGE:
        raise ValueError(f"integer {text[:20]}... does not fit in 64 bits")
    return value


def server_context(cert_file, key_file, verify_mode, ca_files=(), client_validity_checked=True) -> ssl.SSLContext:
    """``client_validity_checked`` False: a client certificate outside its validity period
    passes the handshake (chain and signatures are still verified), for the handler to judge."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    ctx.verify_mode = verify_mode
    for ca in ca_files:
        ctx.load_verify_locations(ca)
    # The device CA is trusted on its own: client chains end there.
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if not client_validity_checked:
        ctx.verify_flags |= VERIFY_NO_CHECK_TIME
    # No session tickets: devices open a fresh connection per rotation step and never
    # resume, and issuing two TLS 1.3 tickets per handshake costs the server ~40% of
    # the handshake's CPU (measured; see tests/server/measure_reenroll.py).
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def listen_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address {text!r} is not HOST:PORT (e.g. 127.0.0.1:8443; port 0 = any free port)")
    host = host.strip("[]") or "127.0.0.1"
    socket.getaddrinfo(host, int(port))
    return host, int(port)
