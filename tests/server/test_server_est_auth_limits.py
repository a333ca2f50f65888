"""EST's password check under attack: each wrong password costs a 16 MiB, ~50 ms
scrypt, so how many run at once is bounded, and one client's repeated failures
are answered cheaply with a wait."""

import base64
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from srvhelpers import RawTls, est_body, http_request, make_csr, new_key

pytestmark = [pytest.mark.timeout(180), pytest.mark.bad_input("password guessing")]
SIMPLEENROLL = "/.well-known/est/simpleenroll"


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def enroll_request(password: str, name: str = "guess") -> bytes:
    csr = est_body(make_csr(new_key(), x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])))
    auth = "Basic " + base64.b64encode(f"bootstrap:{password}".encode()).decode()
    return http_request("POST", SIMPLEENROLL, csr, {"Content-Type": "application/pkcs10", "Authorization": auth})


def attempt(backend, request: bytes, source: str = "127.0.0.1") -> tuple[int, dict]:
    conn = RawTls(backend.est_url, backend.root_ca, timeout=60, source=source)
    try:
        status, headers, _ = conn.send(request).reply()
        return status, headers
    finally:
        conn.close()


def test_concurrent_wrong_passwords_are_bounded(backend):
    """128 clients, each from its own address (so no per-client limit helps), guess at once."""
    before = peak_rss_mib(backend.proc.pid)
    request = enroll_request("wrong")
    results: list[tuple[int, dict]] = []
    go = threading.Barrier(128)

    def guess(i: int):
        go.wait()
        results.append(attempt(backend, request, source=f"127.0.{1 + i // 200}.{1 + i % 200}"))

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(128)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    growth = peak_rss_mib(backend.proc.pid) - before
    statuses = sorted(status for status, _ in results)
    print(f"peak RSS grew {growth:.0f} MiB; replies {dict((s, statuses.count(s)) for s in set(statuses))}")
    assert len(results) == 128 and set(statuses) <= {401, 503}, statuses
    assert all(headers.get("retry-after", "").isdigit() for status, headers in results if status == 503)
    assert growth < 150, f"the server's peak memory grew {growth:.0f} MiB"  # unbounded: 0.9-1.8 GiB
    # Once the burst is over, the right password enrolls.
    password = (backend.dir / "est-password").read_text().strip()
    assert attempt(backend, enroll_request(password, "after-burst"))[0] == 200


def test_repeated_failures_of_one_client_wait(backend):
    password = (backend.dir / "est-password").read_text().strip()
    # Verified once, the password is then checked cheaply: that check must not answer a guesser.
    assert attempt(backend, enroll_request(password, "first"), source="127.0.9.8")[0] == 200
    statuses = [attempt(backend, enroll_request("wrong"), source="127.0.9.9") for _ in range(8)]
    assert [s for s, _ in statuses[:5]] == [401] * 5
    assert all(s == 429 and int(h["retry-after"]) >= 1 for s, h in statuses[5:]), statuses
    # Even the right password waits out the penalty from that address...
    assert attempt(backend, enroll_request(password, "from-guesser"), source="127.0.9.9")[0] == 429
    # ...while other clients are unaffected.
    assert attempt(backend, enroll_request(password, "elsewhere"), source="127.0.9.10")[0] == 200


def test_concurrent_guesses_from_one_client_are_counted(backend):
    """The failure count is checked again once a guess gets its turn: 40 guesses at
    once from one address run scrypt about as often as 5 in a row would."""
    request = enroll_request("wrong")
    results: list[int] = []
    go = threading.Barrier(40)

    def guess():
        go.wait()
        results.append(attempt(backend, request, source="127.0.9.30")[0])

    threads = [threading.Thread(target=guess) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    checked = results.count(401)
    print(f"40 concurrent guesses from one address: {checked} checked, the rest refused ({sorted(set(results))})")
    assert len(results) == 40 and set(results) <= {401, 429, 503}
    assert 1 <= checked <= 5 + 2, f"{checked} guesses were checked"  # 5 allowed, 2 more in flight at most
