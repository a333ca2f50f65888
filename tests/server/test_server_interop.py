"""Independent EST clients against the server: strongSwan's pki, and openssl + curl."""

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from backend import Backend, device_identity
from srvhelpers import certs_from_est, load_cert, load_key, pubkey_pem

pytestmark = pytest.mark.timeout(180)
CURL_PLUGIN = Path("/usr/lib/ipsec/plugins/libstrongswan-curl.so")
OPENSSL_PLUGIN = Path("/usr/lib/ipsec/plugins/libstrongswan-openssl.so")


def run(*cmd, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, timeout=60, **kwargs)
    assert result.returncode == 0, f"{cmd[0]} failed ({result.returncode}):\n{result.stderr.decode(errors='replace')}"
    return result


@pytest.fixture
def one_line_backend(tmp_path):
    """strongSwan 5.9 cannot decode base64 split into lines: the one-line option."""
    if not shutil.which("pki"):
        pytest.skip("strongSwan pki not installed (Debian package strongswan-pki)")
    if not CURL_PLUGIN.exists() or not OPENSSL_PLUGIN.exists():
        pytest.skip("strongSwan's curl/openssl plugins missing (Debian packages libstrongswan-extra-plugins, "
                    "libstrongswan-standard-plugins)")
    backend = Backend(tmp_path / "f", "--b64-one-line")
    backend.start()
    yield backend
    backend.stop()


def test_strongswan_estca_enroll_and_reenroll(one_line_backend, tmp_path):
    backend = one_line_backend
    base = backend.est_url.removesuffix("/.well-known/est")  # pki appends /.well-known/est/...
    run("pki", "--estca", "--url", base, "--cacert", str(backend.root_ca), "--caout", str(tmp_path / "ca.crt"),
        "--outform", "pem")
    # The root goes to --caout, the device CA (a sub CA) to ca-1.crt.
    assert load_cert(tmp_path / "ca.crt") == load_cert(backend.root_ca)
    assert load_cert(tmp_path / "ca-1.crt") == load_cert(backend.dir / "device-ca.crt")

    password = (backend.dir / "est-password").read_text().strip()
    key1 = tmp_path / "key1.der"
    key1.write_bytes(run("pki", "--gen", "--type", "ecdsa", "--size", "256").stdout)
    req1 = run("pki", "--req", "--in", str(key1), "--type", "ecdsa", "--dn", "CN=ss-1").stdout
    (tmp_path / "req1.der").write_bytes(req1)
    cert1 = run("pki", "--est", "--url", base, "--cacert", str(backend.root_ca), "--userpass", f"bootstrap:{password}",
                "--in", str(tmp_path / "req1.der"), "--outform", "pem").stdout
    (tmp_path / "cert1.pem").write_bytes(cert1)
    enrolled = load_cert(tmp_path / "cert1.pem")
    assert enrolled.subject.rfc4514_string() == "CN=ss-1"

    key2 = tmp_path / "key2.der"
    key2.write_bytes(run("pki", "--gen", "--type", "ecdsa", "--size", "256").stdout)
    (tmp_path / "req2.der").write_bytes(
        run("pki", "--req", "--in", str(key2), "--type", "ecdsa", "--dn", "CN=ss-1").stdout)
    cert2 = run("pki", "--est", "--url", base, "--cacert", str(backend.root_ca), "--cert", str(tmp_path / "cert1.pem"),
                "--key", str(key1), "--in", str(tmp_path / "req2.der"), "--outform", "pem").stdout
    (tmp_path / "cert2.pem").write_bytes(cert2)
    renewed = load_cert(tmp_path / "cert2.pem")
    assert renewed.subject.public_bytes() == enrolled.subject.public_bytes()
    assert renewed.serial_number != enrolled.serial_number
    assert "ss-1" in backend.cli("devices", "list").stdout


def test_strongswan_reenrolls_registered_device(one_line_backend, tmp_path):
    """A device tree from `devices register` renewed by strongSwan: its Subject copies byte for byte."""
    backend = one_line_backend
    base = backend.est_url.removesuffix("/.well-known/est")
    device = backend.register("dev-ss", tmp_path / "dev")
    key, cert = device_identity(device)
    new_key = tmp_path / "new.der"
    new_key.write_bytes(run("pki", "--gen", "--type", "ecdsa", "--size", "256").stdout)
    (tmp_path / "req.der").write_bytes(run(
        "pki", "--req", "--in", str(new_key), "--type", "ecdsa",
        "--dn", "CN=dev-ss, OU=certrotate-factory").stdout)
    out = run("pki", "--est", "--url", base, "--cacert", str(backend.root_ca), "--cert", str(cert), "--key", str(key),
              "--in", str(tmp_path / "req.der"), "--outform", "pem").stdout
    (tmp_path / "renewed.pem").write_bytes(out)
    assert load_cert(tmp_path / "renewed.pem").subject.public_bytes() == load_cert(cert).subject.public_bytes()


def test_openssl_and_curl_client(backend, tmp_path):
    """The scripted client an operator would write: openssl makes the CSR, curl talks EST."""
    if not shutil.which("curl") or not shutil.which("openssl"):
        pytest.skip("curl and openssl are needed (Debian packages curl, openssl)")
    device = backend.register("dev-curl", tmp_path / "dev")
    key, cert = device_identity(device)
    tls = ["--silent", "--show-error", "--fail", "--cacert", str(backend.root_ca)]

    cacerts = run("curl", *tls, f"{backend.est_url}/cacerts").stdout
    (tmp_path / "cacerts.der").write_bytes(base64.b64decode(b"".join(cacerts.split())))
    chain = run("openssl", "pkcs7", "-inform", "DER", "-in", str(tmp_path / "cacerts.der"), "-print_certs").stdout
    assert chain.count(b"BEGIN CERTIFICATE") == 2

    new_key = tmp_path / "new.key"
    run("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(new_key))
    # x509toreq copies the Subject (and with copy_extensions, the SAN) of the current certificate.
    run("openssl", "x509", "-x509toreq", "-in", str(cert), "-signkey", str(new_key), "-copy_extensions", "copyall",
        "-out", str(tmp_path / "req.pem"))
    run("openssl", "req", "-in", str(tmp_path / "req.pem"), "-outform", "DER", "-out", str(tmp_path / "req.der"))
    (tmp_path / "req.b64").write_bytes(base64.encodebytes((tmp_path / "req.der").read_bytes()))
    reply = run("curl", *tls, "--cert", str(cert), "--key", str(key), "-H", "Content-Type: application/pkcs10",
                "--data-binary", f"@{tmp_path / 'req.b64'}", f"{backend.est_url}/simplereenroll").stdout
    [renewed] = certs_from_est(reply)
    assert pubkey_pem(renewed.public_key()) == pubkey_pem(load_key(new_key))
    assert renewed.subject.public_bytes() == load_cert(cert).subject.public_bytes()
    assert renewed.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False

    # Announce the new key, then use the new certificate at the gateway, all with curl.
    (tmp_path / "renewed.pem").write_bytes(renewed.public_bytes(Encoding.PEM))
    (tmp_path / "announce.json").write_text(json.dumps({"next_pubkey": pubkey_pem(renewed.public_key())}))
    run("curl", *tls, "--cert", str(cert), "--key", str(key), "-X", "PATCH", "-H", "Content-Type: application/json",
        "--data-binary", f"@{tmp_path / 'announce.json'}", f"{backend.gateway_url}/device")
    info = json.loads(run("curl", *tls, "--cert", str(tmp_path / "renewed.pem"), "--key", str(new_key),
                          f"{backend.gateway_url}/device").stdout)
    assert info["pubkey"] == pubkey_pem(renewed.public_key())
