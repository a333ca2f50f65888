"""init, serve and devices register, against docs/contracts.md."""

import json
import os
import stat
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from backend import Backend, server_command
from srvhelpers import load_cert, load_key, pubkey_pem

pytestmark = pytest.mark.timeout(120)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_init_creates_pki(tmp_path):
    backend = Backend(tmp_path / "f", "--name", "acme", "--hostname", "gw.example", "--hostname", "192.0.2.7")
    d = backend.dir
    root, ca = load_cert(d / "root.crt"), load_cert(d / "device-ca.crt")
    assert root.subject == root.issuer
    assert ca.issuer == root.subject
    ca.verify_directly_issued_by(root)
    days = lambda c: (c.not_valid_after_utc - c.not_valid_before_utc).days  # noqa: E731
    assert days(root) >= 29 * 365 and 24 * 365 <= days(ca) <= days(root)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for role in ("gateway", "est"):
        cert = load_cert(d / f"{role}.crt")
        cert.verify_directly_issued_by(root)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["gw.example"]
        assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.7"]
        assert mode(d / f"{role}.key") == 0o600
    for key in ("root.key", "device-ca.key", "est-password"):
        assert mode(d / key) == 0o600
    assert json.loads((d / "factory.json").read_text())["name"] == "acme"


def test_init_default_hostnames(tmp_path):
    backend = Backend(tmp_path / "f")
    san = load_cert(backend.dir / "gateway.crt").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sorted(str(i) for i in san.get_values_for_type(x509.IPAddress)) == ["10.0.2.2", "127.0.0.1"]


def test_init_imports_root_ca(tmp_path):
    first = Backend(tmp_path / "a")
    second = Backend(tmp_path / "b", "--root-ca-cert", str(first.dir / "root.crt"),
                     "--root-ca-key", str(first.dir / "root.key"))
    assert (second.dir / "root.crt").read_bytes() == (first.dir / "root.crt").read_bytes()
    assert not (second.dir / "root.key").exists()
    load_cert(second.dir / "device-ca.crt").verify_directly_issued_by(load_cert(first.dir / "root.crt"))


def test_init_refuses_existing_factory_and_mismatched_root(tmp_path):
    backend = Backend(tmp_path / "a")
    again = backend.cli("init", check=False)
    assert again.returncode == 2 and "already holds a factory" in again.stderr
    other = Backend(tmp_path / "b")
    bad = subprocess.run([*server_command(), "init", "--dir", str(tmp_path / "c"),
                          "--root-ca-cert", str(backend.dir / "root.crt"),
                          "--root-ca-key", str(other.dir / "root.key")], capture_output=True, text=True)
    assert bad.returncode == 2 and "is not the key of" in bad.stderr


@pytest.mark.bad_input("server Retry-After below 1 s")
@pytest.mark.parametrize("seconds", ["0", "-5"])
def test_init_refuses_a_retry_after_below_one_second(seconds, tmp_path):
    result = subprocess.run([*server_command(), "init", "--dir", str(tmp_path / "f"), "--manual-approval",
                             "--retry-after", seconds], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--retry-after must be at least 1 second" in result.stderr
    assert not (tmp_path / "f" / "factory.json").exists()


def test_commands_without_factory_say_what_to_do(tmp_path):
    result = subprocess.run([*server_command(), "devices", "list", "--dir", str(tmp_path / "none")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "certrotate-server init" in result.stderr


def test_serve_writes_and_removes_endpoints(backend):
    info = json.loads((backend.dir / "endpoints.json").read_text())
    assert info["pid"] == backend.proc.pid
    assert info["gateway"].startswith("https://127.0.0.1:")
    assert info["est"].startswith("https://127.0.0.1:") and info["est"].endswith("/.well-known/est")
    assert info["gateway"].rsplit(":", 1)[1] != info["est"].split(":")[2].split("/")[0]
    assert backend.stop() == 0
    assert not (backend.dir / "endpoints.json").exists()


def test_register_writes_device_tree(backend, tmp_path):
    root = backend.register("dev-1", tmp_path / "dev-1")
    sota_dir = root / "var/sota"
    assert mode(sota_dir / "pkey.pem") == 0o600
    for name in ("client.pem", "root.crt", "sota.toml"):
        assert mode(sota_dir / name) == 0o644
    assert mode(root / "etc/certrotate/certrotate.toml") == 0o644
    assert (sota_dir / "root.crt").read_bytes() == backend.root_ca.read_bytes()

    sota = tomllib.loads((sota_dir / "sota.toml").read_text())
    assert sota["tls"] == {"server": backend.gateway_url, "ca_source": "file", "pkey_source": "file",
                           "cert_source": "file"}
    assert sota["uptane"]["repo_server"] == backend.gateway_url + "/repo"
    assert sota["import"] == {"base_path": "/var/sota", "tls_cacert_path": "/var/sota/root.crt",
                              "tls_clientcert_path": "/var/sota/client.pem", "tls_pkey_path": "/var/sota/pkey.pem"}
    assert tomllib.loads((root / "etc/certrotate/certrotate.toml").read_text())["est"]["server"] == backend.est_url

    cert, key = load_cert(sota_dir / "client.pem"), load_key(sota_dir / "pkey.pem")
    assert pubkey_pem(cert.public_key()) == pubkey_pem(key)
    cert.verify_directly_issued_by(load_cert(backend.dir / "device-ca.crt"))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-1"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "certrotate-factory"
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days >= 20 * 365
    assert cert.not_valid_after_utc <= load_cert(backend.dir / "device-ca.crt").not_valid_after_utc
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH])
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    reply = backend.gateway(root, "GET", "/device")
    assert reply.status_code == 200 and reply.json()["name"] == "dev-1"


def test_register_with_explicit_urls_and_no_server(tmp_path):
    backend = Backend(tmp_path / "f")
    missing = backend.cli("devices", "register", "d", "--out", str(tmp_path / "d"), check=False)
    assert missing.returncode == 2 and "--gateway-url" in missing.stderr
    root = backend.register("d", tmp_path / "d", "--gateway-url", "https://10.0.2.2:8443",
                            "--est-url", "https://10.0.2.2:8444/.well-known/est")
    assert tomllib.loads((root / "var/sota/sota.toml").read_text())["tls"]["server"] == "https://10.0.2.2:8443"


def test_register_refuses_duplicate_and_bad_names(backend, tmp_path):
    backend.register("dev-1", tmp_path / "a")
    dup = backend.cli("devices", "register", "dev-1", "--out", str(tmp_path / "b"), check=False)
    assert dup.returncode == 1 and "already registered" in dup.stderr
    assert not (tmp_path / "b").exists()
    occupied = backend.cli("devices", "register", "dev-2", "--out", str(tmp_path / "a"), check=False)
    assert occupied.returncode == 1 and "already holds a device" in occupied.stderr
    bad = backend.cli("devices", "register", "../evil", "--out", str(tmp_path / "c"), check=False)
    assert bad.returncode == 1 and "not allowed" in bad.stderr


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_worker_processes_serve_and_leave_nothing(tmp_path, stop):
    backend = Backend(tmp_path / "f")
    backend.start(workers=3)
    workers = _children(backend.proc.pid)
    assert len(workers) == 2
    device = backend.register("d", tmp_path / "d")
    # Fresh connections land on any worker; all share one store.
    assert all(backend.gateway(device, "GET", "/device").status_code == 200 for _ in range(12))
    if stop == "sigterm":
        assert backend.stop() == 0
        assert not (backend.dir / "endpoints.json").exists()
    else:
        backend.kill()
    deadline = time.monotonic() + 10
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_alive, workers)), "a worker outlived the server"
    backend.start()  # restarts on the same directory
    assert backend.gateway(device, "GET", "/device").status_code == 200
    backend.stop()


@pytest.mark.bad_input("name with a trailing newline")
def test_register_refuses_a_name_with_a_trailing_newline(backend, tmp_path):
    # `$` matches before a final "\n": the name check must match the whole name.
    bad = backend.cli("devices", "register", "new-d\n", "--out", str(tmp_path / "nl"), check=False)
    assert bad.returncode == 1 and "not allowed" in bad.stderr, bad.stderr
    assert not (tmp_path / "nl").exists()
    assert "new-d" not in backend.cli("devices", "list").stdout


@pytest.mark.bad_input("umask 000 at registration")
def test_register_makes_directories_with_explicit_modes(backend, tmp_path):
    out = tmp_path / "made" / "dev-u"
    subprocess.run([*server_command(), "devices", "register", "dev-u", "--out", str(out), "--dir", str(backend.dir)],
                   check=True, capture_output=True, umask=0)
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777
             for p in [tmp_path / "made", out, out / "var", out / "var/sota", out / "etc", out / "etc/certrotate"]}
    assert modes == {"made": 0o755, "made/dev-u": 0o755, "made/dev-u/var": 0o755, "made/dev-u/var/sota": 0o700,
                     "made/dev-u/etc": 0o755, "made/dev-u/etc/certrotate": 0o755}
    assert (out / "var/sota/pkey.pem").stat().st_mode & 0o777 == 0o600
