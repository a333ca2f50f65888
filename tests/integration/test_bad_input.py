"""Bad EST replies, each met by the real agent CLI (`certrotate --root DEV rotate`).

The EST server is tests/estfaults.py's faulty one, over real TLS on 127.0.0.1,
with a TLS certificate from the real backend's root and device certificates
signed by the backend's own device CA, so that everything but the one fault
is genuine. For each case: a clear error naming the step, exit code 1, the old
identity intact (same key and certificate files, sota.toml unchanged, the
gateway still accepting the old certificate), and the rotation resumable: once
the server is fixed (it relays to the backend's real EST server), a second
run completes the rotation.
"""

from __future__ import annotations

import email.utils
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from agentdevice import AGENT_TIMEOUT, OldIdentity, active_identity, assert_rotated, fake_systemctl, run_agent
from estfaults import Answer, FaultyEst, Request, b64_lines, certs_answer
from pki import DAY, Authority, TestPki, device_name, new_key, utcnow

pytestmark = [pytest.mark.timeout(300), pytest.mark.bad_input("EST reply to the agent")]

STEP = "Generate new certificate"
HTML_PAGE = (b"<!DOCTYPE html>\n<html><head><title>503 Service Temporarily Unavailable</title>"
             b"</head><body><center>nginx</center></body></html>\n")


def issued(**changes):
    """A fault: a certs-only reply holding a certificate for the CSR with ``changes``."""
    return lambda server, request: certs_answer([server.issue(request, **changes)])


def bare_certificate(server: FaultyEst, request: Request) -> Answer:
    """A DER certificate, base64: valid base64, valid DER, but no PKCS#7 around it."""
    return Answer(body=b64_lines(server.issue(request).public_bytes(serialization.Encoding.DER)))


# case -> (what the faulty server answers to simplereenroll, what stderr must say)
CASES = {
    "malformed base64": (
        lambda server, request: Answer(body=b"MIIBxTCCAWug!!!*not*base64*\n"),
        r"EST simplereenroll: the reply is not valid base64"),
    "not PKCS#7": (
        bare_certificate,
        r"EST simplereenroll: the reply is not PKCS#7"),
    "PKCS#7 with no certificate": (
        lambda server, request: certs_answer([]),
        r"the PKCS#7 reply holds no certificate"),
    "PKCS#7 with two certificates": (
        lambda server, request: certs_answer([server.issue(request), server.issue(request)]),
        r"holds 2 end-entity certificates; exactly one was expected"),
    "certificate for another key": (
        lambda server, request: certs_answer([server.issue(request, public_key=new_key().public_key())]),
        r"the issued certificate is for another key"),
    "another subject": (
        issued(subject=device_name("someone-else", "certrotate-factory")),
        r"the issued certificate names another subject: '.*someone-else'"),
    "expired": (
        lambda server, request: certs_answer([server.issue(
            request, not_before=utcnow() - 30 * DAY, not_after=utcnow() - DAY)]),
        r"the issued certificate \(.*\) expired"),
    "not yet valid": (
        lambda server, request: certs_answer([server.issue(
            request, not_before=utcnow() + DAY, not_after=utcnow() + 30 * DAY)]),
        r"the issued certificate \(.*\) is not valid yet"),
    "untrusted CA, nowhere on the device": (
        issued(issuer=TestPki("certrotate-factory").device_ca),
        r"nothing on the device vouches for it"),
    "untrusted CA sent along": (
        lambda server, request, twin=TestPki("certrotate-factory").device_ca: certs_answer(
            [server.issue(request, issuer=twin), twin.cert]),
        r"does not chain to the trust anchor"),
    "wrong content type": (
        lambda server, request: certs_answer([server.issue(request)], content_type="application/octet-stream"),
        r"content type 'application/octet-stream' instead of application/pkcs7-mime"),
    "HTML error page": (
        lambda server, request: Answer(body=HTML_PAGE, content_type="text/html"),
        r"an HTML page titled '503 Service Temporarily Unavailable'"),
    "4xx with a text body": (
        lambda server, request: Answer(status=400, body=b"CSR rejected: key too weak\nrequest id 7f3a\n",
                                       content_type="text/plain; charset=utf-8"),
        r"EST simplereenroll answered 400: 'CSR rejected: key too weak'"),
    "truncated body": (
        lambda server, request: certs_answer([server.issue(request)], cut_after=120),
        r"EST simplereenroll: .*the reply broke off after 120 of \d+ body bytes"),
    "oversized body": (
        lambda server, request: Answer(body=b"QUFB" * (1 << 19)),
        r"the reply announces 2097152 bytes, more than the 1048576-byte limit"),
    "connection reset mid-body": (
        lambda server, request: certs_answer([server.issue(request)], reset_after=120),
        r"EST simplereenroll: .*the reply broke off after 120 of \d+ body bytes"),
}


def load_authority(directory: Path, name: str) -> Authority:
    key = load_pem_private_key((directory / f"{name}.key").read_bytes(), None)
    return Authority(key, x509.load_pem_x509_certificate((directory / f"{name}.crt").read_bytes()))


@pytest.fixture
def faulty(module_backend, tmp_path):
    root = load_authority(module_backend.dir, "root")
    device_ca = load_authority(module_backend.dir, "device-ca")
    with FaultyEst(root, device_ca, tmp_path / "faulty-est") as server:
        yield server


def device_files(device: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of /var/sota but the agent's own state dir: contents and mode."""
    sota = device / "var/sota"
    return {
        str(path.relative_to(sota)): (path.read_bytes(), path.stat().st_mode & 0o777)
        for path in sorted(sota.rglob("*"))
        if path.is_file() and "certrotate" not in path.relative_to(sota).parts
    }


def only_reenroll(server: FaultyEst, fault):
    """Break simplereenroll; answer everything else correctly."""
    def answer(request: Request) -> Answer:
        if request.operation == "simplereenroll":
            return fault(server, request)
        return server.good_answer(request)
    return answer


def fail_then_resume(backend, server: FaultyEst, tmp_path: Path, name: str, expected: str,
                     fix=lambda: None, *, settings: dict[str, dict] | None = None,
                     code: int = 1, within: float = AGENT_TIMEOUT):
    """Run the agent against the faulty server, check the failure, fix the server, run again.

    ``settings`` go into certrotate.toml for the failing run only; it must end with exit
    ``code`` within ``within`` seconds. Returns that run and how long it took.
    """
    device = backend.register(name, tmp_path / name)
    old = OldIdentity(device, tmp_path / "old")
    before = device_files(device)
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)
    agent_toml = device / "etc/certrotate/certrotate.toml"
    plain_settings = agent_toml.read_text()
    if settings:
        agent_toml.write_text(with_settings(plain_settings, settings))

    started = time.monotonic()
    try:
        failed = run_agent(device, "rotate", "--est-server", server.url, bin_dir=bin_dir, timeout=within)
    except subprocess.TimeoutExpired:
        failed = None
    elapsed = time.monotonic() - started
    assert failed is not None, (f"the agent was still running after {within:g} s, having sent "
                                f"{len(server.requests)} requests to the EST server")
    assert failed.returncode == code, failed.stderr
    assert f"step '{STEP}'{' failed' if code == 1 else ':'}" in failed.stderr, failed.stderr
    assert re.search(expected, failed.stderr), failed.stderr
    assert re.search(r"what to do: \S", failed.stderr), failed.stderr
    assert "PRIVATE KEY" not in failed.stderr
    # The old identity is untouched and still good at the gateway.
    assert device_files(device) == before
    assert active_identity(device) == (old.device_key_file, device / "var/sota/client.pem")
    assert backend.gateway(device, "GET", "/device").status_code == 200
    status = json.loads(run_agent(device, "status", "--json", bin_dir=bin_dir).stdout)
    assert status["rotation"]["last_error"]["step"] == STEP
    assert re.search(expected, status["rotation"]["last_error"]["message"])

    # The EST server is fixed: the same rotation resumes and completes.
    key_file, cert_file = active_identity(device)
    agent_toml.write_text(plain_settings)
    fix()
    server.forward_to(backend.est_url, backend.root_ca, (cert_file, key_file))
    resumed = run_agent(device, "rotate", bin_dir=bin_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 1" in resumed.stderr
    assert_rotated(backend, device, old, device_values={}, local_values=None)
    return failed, elapsed


def with_settings(toml: str, settings: dict[str, dict]) -> str:
    """certrotate.toml text with ``settings`` ({table: {key: number}}) added."""
    for table, values in settings.items():
        lines = "".join(f"{key} = {value}\n" for key, value in values.items())
        header = f"[{table}]\n"
        toml = toml.replace(header, header + lines) if header in toml else f"{toml}\n{header}{lines}"
    return toml


@pytest.mark.parametrize("case", list(CASES))
def test_bad_est_reply(case, module_backend, faulty, tmp_path):
    fault, expected = CASES[case]
    faulty.answer = only_reenroll(faulty, fault)
    name = re.sub(r"[^a-z0-9]+", "-", case.lower()).strip("-")
    fail_then_resume(module_backend, faulty, tmp_path, name, expected)


def test_est_server_certificate_naming_another_host(module_backend, tmp_path):
    root = load_authority(module_backend.dir, "root")
    device_ca = load_authority(module_backend.dir, "device-ca")
    with FaultyEst(root, device_ca, tmp_path / "faulty-est", names=("est.elsewhere.example",)) as server:
        fail_then_resume(module_backend, server, tmp_path, "wrong-host",
                         r"EST simplereenroll: TLS handshake with 127\.0\.0\.1:\d+ failed: .*"
                         r"(Hostname mismatch|IP address mismatch|doesn't match)",
                         fix=lambda: server.use_names(("127.0.0.1",)))
        assert server.requests[:1] and server.requests[0].operation == "simplereenroll"
        assert len(server.tls_errors) >= 1


# Servers that would keep a run, and its lock, alive for ever. Each run must end on
# its own within its bound plus SLACK (start-up and exit of the agent on a loaded machine).
SLACK = 8.0


def pending(retry_after: str):
    """A fault: 202 (still processing) with this Retry-After."""
    return lambda server, request: Answer(status=202, content_type=None, headers={"Retry-After": retry_after})


@pytest.mark.bad_input("EST 202 asking for no wait")
@pytest.mark.parametrize("retry_after", ["0", "an hour ago"])
def test_pending_enrollment_asking_for_no_wait_ends_with_exit_4(retry_after, module_backend, faulty, tmp_path):
    if retry_after == "an hour ago":
        retry_after = email.utils.formatdate(time.time() - 3600, usegmt=True)
    faulty.answer = only_reenroll(faulty, pending(retry_after))
    _, elapsed = fail_then_resume(
        module_backend, faulty, tmp_path, f"pending-{len(retry_after)}", r"EST simplereenroll: the server still holds "
        r"the request pending \(202\) after \d+ requests in \d+ s", settings={"est": {"max_wait": 4}},
        code=4, within=4 + SLACK)
    reenrolls = [r for r in faulty.requests if r.operation == "simplereenroll"]
    # The first request, then one a second at most (the floor of any Retry-After) for 4 s;
    # the relay's requests come after.
    failing = reenrolls[:len(reenrolls) - 1]
    assert 2 <= len(failing) <= 6, (len(failing), elapsed)


@pytest.mark.bad_input("EST reply dribbled a byte at a time")
def test_dribbled_reply_ends_at_the_request_deadline(module_backend, faulty, tmp_path):
    faulty.answer = only_reenroll(faulty, lambda server, request: certs_answer([server.issue(request)], drip=0.5))
    fail_then_resume(
        module_backend, faulty, tmp_path, "dribbled-reply",
        r"EST simplereenroll: POST https://127\.0\.0\.1:\d+/\S+: the whole reply did not arrive within 2 s",
        settings={"deadlines": {"request": 2}}, within=2 + SLACK)


@pytest.mark.bad_input("EST reply dribbled a byte at a time")
def test_dribbled_reply_ends_at_the_run_deadline(module_backend, faulty, tmp_path):
    faulty.answer = only_reenroll(faulty, lambda server, request: certs_answer([server.issue(request)], drip=0.5))
    failed, _ = fail_then_resume(
        module_backend, faulty, tmp_path, "run-deadline",
        r"EST simplereenroll: POST https://127\.0\.0\.1:\d+/\S+: the run's 3 s deadline passed "
        r"while waiting for 127\.0\.0\.1:\d+", settings={"deadlines": {"run": 3}}, within=3 + SLACK)
    assert "deadlines.run" in failed.stderr
