"""Every HTTPS request of the agent goes through here.

TLS verification is always on: the server must chain to the trust anchor file
given to ``make_session`` and its certificate must name the host in the URL.
There is no way to turn that off, not even through environment variables
(``REQUESTS_CA_BUNDLE`` and friends are ignored for verification).

Only https URLs are sent: a plain-text URL is refused before any byte leaves.

Reads are bounded: a reply body larger than ``max_body`` is refused before
more of it is read, and the whole reply must arrive within ``reply_within``
seconds (a per-read timeout alone lets a server dribble a reply for ever) and
before the run's deadline (certrotate.deadline). Connect failures, timeouts,
broken or truncated bodies and 5xx answers are retried with capped exponential
backoff and jitter; what is still failing after the last attempt becomes a
``TransportError`` that says what happened and what the operator can do.
"""

from __future__ import annotations

import json as jsonlib
import random
import ssl
import time
from typing import Any, Callable
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.exceptions import NewConnectionError
from urllib3.util.ssl_ import create_urllib3_context

from . import crashpoints
from .deadline import Deadline

BACKOFF_BASE = 1.0  # seconds before the second attempt
BACKOFF_CAP = 30.0  # no single wait is longer than this
# Seconds for a whole reply (connect, TLS, headers, body): ours are a few KiB, so
# even a poor cellular link is far inside it, and a stalled server not for long.
REPLY_DEADLINE = 60.0
_CHUNK = 64 * 1024
_TOO_BIG_HINT = "the server sent far more than this request needs; check the URL and the server"


class TransportError(Exception):
    """A request that could not be completed; ``hint`` says what to do."""

    def __init__(self, message: str, *, hint: str, status: int | None = None):
        super().__init__(message)
        self.hint = hint
        self.status = status

    def __str__(self) -> str:
        return f"{self.args[0]} ({self.hint})"


class RunDeadlinePassed(TransportError):
    """The run's deadline passed before the request could complete."""


class Reply:
    """A complete, bounded HTTP reply."""

    def __init__(self, url: str, status: int, headers: CaseInsensitiveDict, body: bytes):
        self.url = url
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def first_line(self, limit: int = 200) -> str:
        """The first non-blank line of the body, for error messages."""
        for line in self.text.splitlines():
            if line.strip():
                return line.strip()[:limit]
        return ""

    def json(self) -> Any:
        try:
            return jsonlib.loads(self.body)
        except ValueError as err:
            raise TransportError(
                f"{self.url} answered {self.status} with a body that is not JSON ({err}): "
                f"{self.first_line()!r}",
                hint="check that the URL points at the right server",
                status=self.status,
            ) from err


class _VerifyingSession(requests.Session):
    """A session whose TLS verification cannot be switched off or redirected."""

    def __init__(self, ca_file: str):
        super().__init__()
        self.ca_file = ca_file
        self.verify = ca_file

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        # Environment (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE) and per-call verify=
        # would otherwise override the trust anchor.
        settings["verify"] = self.ca_file
        return settings


class _DeadlineSocket(ssl.SSLSocket):
    """A TLS socket that never blocks past its context's ``reply_deadline``: the
    handshake and each read may wait for what is left of it at most."""

    def settimeout(self, value):
        self._per_read_timeout = value  # what urllib3 asked for, before the deadline shortens it
        super().settimeout(value)

    def _bound_by_deadline(self) -> None:
        left = self.context.reply_deadline.left()
        if left <= 0:
            raise TimeoutError("the reply deadline has passed")
        wanted = self._per_read_timeout
        super().settimeout(left if wanted is None else min(wanted, left))

    def do_handshake(self, *args, **kwargs):
        self._bound_by_deadline()
        return super().do_handshake(*args, **kwargs)

    def recv_into(self, *args, **kwargs):
        self._bound_by_deadline()
        return super().recv_into(*args, **kwargs)


class _DeadlineAdapter(HTTPAdapter):
    """Connections whose TLS sockets are _DeadlineSockets of ``tls``."""

    def __init__(self, tls: ssl.SSLContext):
        self.tls = tls  # before super().__init__, which makes the pool manager
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, ssl_context=self.tls, **kwargs)


def make_session(ca_file: str, client_cert: tuple[str, str] | None = None) -> requests.Session:
    """A session trusting only ``ca_file``; ``client_cert`` is (cert_path, key_path)."""
    session = _VerifyingSession(str(ca_file))
    if client_cert is not None:
        session.cert = (str(client_cert[0]), str(client_cert[1]))
    # Ask for the body as is, so Content-Length counts the bytes we read.
    session.headers["Accept-Encoding"] = "identity"
    # urllib3 loads the trust anchor and the client certificate into this context.
    tls = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
    tls.sslsocket_class = _DeadlineSocket
    tls.reply_deadline = Deadline(None)  # send() sets one per attempt
    session.mount("https://", _DeadlineAdapter(tls))
    session.tls = tls
    return session


class _Retryable(Exception):
    """One attempt failed in a way that another attempt may not."""

    def __init__(self, error: TransportError):
        super().__init__(str(error))
        self.error = error


def send(
    session: requests.Session,
    method: str,
    url: str,
    *,
    point: str,
    data: bytes | str | None = None,
    json: Any = None,
    headers: dict[str, str] | None = None,
    max_body: int = 1 << 20,
    timeout: float = 30.0,
    attempts: int = 5,
    sleep: Callable[[float], None] = time.sleep,
    reply_within: float = REPLY_DEADLINE,
    run: Deadline | None = None,
) -> Reply:
    """Send one request, retrying transient failures; return the final reply.

    ``timeout`` bounds each read, ``reply_within`` each attempt's whole reply,
    ``run`` (the run's deadline) everything. Replies with status < 500 are
    returned whatever their status; the caller decides what a 4xx means. A 5xx
    still present after the last attempt raises ``TransportError`` with ``status`` set.
    """
    run = run or Deadline(None)
    if urlsplit(url).scheme != "https":
        raise TransportError(
            f"{method} {url}: refused, the URL is not https (it would travel in plain text)",
            hint="use an https:// URL",
        )
    crashpoints.reach(point + ":send")
    last: TransportError | None = None
    for attempt in range(attempts):
        if attempt:
            delay = backoff_delay(attempt)
            if delay >= run.left():
                last.args = (f"{last.args[0]}; gave up after {attempt} attempts, the run's "
                             f"{run.seconds:g} s deadline being too near for another",)
                raise last
            sleep(delay)
        if run.passed():
            raise _run_deadline_passed(method, url, run)
        session.tls.reply_deadline = reply_by = run.within(reply_within)
        try:
            reply = _attempt(session, method, url, data, json, headers, max_body, timeout)
        except (_Retryable, TransportError) as failure:
            if run.passed():
                raise _run_deadline_passed(method, url, run) from failure
            if reply_by.passed():
                # Not retried: a server this slow holds up the run (and the lock) for
                # another deadline each time; the next run tries again.
                raise _reply_too_slow(method, url, reply_within) from failure
            if isinstance(failure, TransportError):
                raise
            last = failure.error
            continue
        if reply.status >= 500:
            last = TransportError(
                f"{method} {url} answered {reply.status}: {reply.first_line()!r}",
                hint="the server has an internal problem; retry later or check its logs",
                status=reply.status,
            )
            continue
        crashpoints.reach(point + ":reply")
        return reply
    assert last is not None
    if attempts > 1:
        last.args = (f"{last.args[0]}; gave up after {attempts} attempts",)
    raise last


def _run_deadline_passed(method: str, url: str, run: Deadline) -> RunDeadlinePassed:
    target = _host_port(url)
    return RunDeadlinePassed(
        f"{method} {url}: the run's {run.seconds:g} s deadline passed while waiting for {target}",
        hint=f"check the network path to {target} and that server; the rotation stays "
        "resumable on the current identity and the next run goes on with it "
        "(deadlines.run in /etc/certrotate/certrotate.toml sets the bound)",
    )


def _reply_too_slow(method: str, url: str, reply_within: float) -> TransportError:
    target = _host_port(url)
    return TransportError(
        f"{method} {url}: the whole reply did not arrive within {reply_within:g} s "
        f"({target} sends too slowly or stalls)",
        hint=f"check the network path to {target} and that server's load; the next run tries again",
    )


def backoff_delay(attempt: int) -> float:
    """Wait before attempt number ``attempt`` (1-based retry count), with jitter."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))
    return ceiling * random.uniform(0.5, 1.0)


def _attempt(session, method, url, data, json, headers, max_body, timeout) -> Reply:
    target = _host_port(url)
    try:
        response = session.request(
            method, url, data=data, json=json, headers=headers, timeout=timeout,
            stream=True, allow_redirects=False,
        )
    except requests.exceptions.SSLError as err:
        # Not retried: another attempt meets the same certificate.
        raise TransportError(
            f"TLS handshake with {target} failed: {_reason(err)}",
            hint=f"the server's certificate must chain to the trust anchor and name "
            f"{urlsplit(url).hostname}; check the URL and the CA file {session.verify}; "
            "if the server rejected our client certificate, check the device's key and certificate",
        ) from err
    except requests.exceptions.Timeout as err:
        raise _Retryable(TransportError(
            f"{method} {url} timed out after {timeout:g} s",
            hint=f"check the network path to {target} and that the server is up",
        )) from err
    except requests.exceptions.ConnectionError as err:
        if any(isinstance(inner, NewConnectionError) for inner in _causes(err)):
            message = f"cannot connect to {target}: {_reason(err)}"
        else:
            message = f"the connection to {target} broke before a reply: {_reason(err)}"
        raise _Retryable(TransportError(
            message, hint=f"check the network and that the server at {target} is running",
        )) from err
    except requests.exceptions.RequestException as err:
        raise TransportError(
            f"{method} {url} failed: {err}",
            hint="check the URL",
        ) from err
    with response:
        body = _read_bounded(response, method, url, max_body)
        return Reply(url, response.status_code, response.headers, body)


def _read_bounded(response: requests.Response, method: str, url: str, max_body: int) -> bytes:
    declared = _declared_length(response)
    if declared is not None and declared > max_body:
        raise TransportError(
            f"{method} {url}: the reply announces {declared} bytes, more than the "
            f"{max_body}-byte limit",
            hint=_TOO_BIG_HINT,
            status=response.status_code,
        )
    chunks = []
    received = 0
    try:
        for chunk in response.iter_content(_CHUNK):
            received += len(chunk)
            if received > max_body:
                raise TransportError(
                    f"{method} {url}: the reply body exceeds the {max_body}-byte limit",
                    hint=_TOO_BIG_HINT,
                    status=response.status_code,
                )
            chunks.append(chunk)
    except requests.exceptions.RequestException as err:
        raise _broken_off(response, method, url, declared, _reason(err)) from err
    if declared is not None and response.raw.tell() < declared:
        # urllib3 1.x does not enforce Content-Length: a cut body looks complete.
        raise _broken_off(response, method, url, declared, None)
    return b"".join(chunks)


def _broken_off(response, method, url, declared: int | None, reason: str | None) -> _Retryable:
    """A body that ended early; TLS stacks report a reset mid-body either as an
    error (``reason``) or as an early end, so both read the same."""
    of = f" of {declared}" if declared is not None else ""
    because = f" ({reason})" if reason else ""
    return _Retryable(TransportError(
        f"{method} {url}: the reply broke off after {response.raw.tell()}{of} body bytes{because}",
        hint="the reply was cut off; check the network path and the server's logs",
        status=response.status_code,
    ))


def _declared_length(response: requests.Response) -> int | None:
    value = response.headers.get("Content-Length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 443}"


def _causes(err: BaseException):
    """``err`` and what it wraps, outermost first (requests and urllib3 nest deeply)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        inner = err.__cause__ or err.__context__
        if inner is None:
            inner = getattr(err, "reason", None)
            if not isinstance(inner, BaseException):
                inner = next((a for a in err.args if isinstance(a, BaseException)), None)
        err = inner


def _reason(err: BaseException) -> str:
    """The innermost cause of a requests/urllib3 error, readable."""
    *_, innermost = _causes(err)
    if isinstance(innermost, ConnectionResetError):
        return "connection reset by peer"
    return str(innermost) or type(innermost).__name__
