"""A real PKCS#11 token for tests: SoftHSM2, driven by OpenSC's pkcs11-tool.

Each SoftHsm is its own token directory and configuration (SOFTHSM2_CONF),
so tests never share a token. A device is registered into it the way
lmp-device-register does: token "aktualizr", a P-256 pair generated in the
token at id 01 labelled "tls", the certificate issued for its CSR stored at
id 03 labelled "client", sota.toml's [tls] sources "pkcs11" and its [p11]
section. The tools are not the agent's code: pkcs11-tool makes the objects,
openssl with pkcs11-provider signs the CSR. PINs reach them through the
environment (``--pin env:NAME``), never a command line.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

USER_PIN = "87654321"
SO_PIN = "12345678"
TOKEN_LABEL = "aktualizr"
MODULE_CANDIDATES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")


def softhsm_module() -> str:
    for path in MODULE_CANDIDATES:
        if os.path.exists(path):
            return path
    raise AssertionError("SoftHSM2 is not installed: run `bash ci/setup test` (Debian package softhsm2)")


class SoftHsm:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.tokens = self.dir / "tokens"
        self.tokens.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "softhsm2.conf"
        self.conf.write_text(f"directories.tokendir = {self.tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
        self.module = softhsm_module()
        self.env = {"SOFTHSM2_CONF": str(self.conf)}

    def tool(self, *args: str, login: bool = True, so: bool = False, check: bool = True,
             token: bool = True) -> subprocess.CompletedProcess:
        command = ["pkcs11-tool", "--module", self.module]
        if token:
            command += ["--token-label", TOKEN_LABEL]
        if so:
            command += ["--login", "--login-type", "so", "--so-pin", "env:CERTROTATE_TEST_SO_PIN"]
        elif login:
            command += ["--login", "--pin", "env:CERTROTATE_TEST_PIN"]
        env = {**os.environ, **self.env, "CERTROTATE_TEST_PIN": USER_PIN, "CERTROTATE_TEST_SO_PIN": SO_PIN}
        done = subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"pkcs11-tool {' '.join(args)} failed: {done.stderr}{done.stdout}")
        return done

    def init_token(self, label: str = TOKEN_LABEL) -> None:
        self.tool("--slot-index", "0", "--init-token", "--label", label, "--so-pin",
                  "env:CERTROTATE_TEST_SO_PIN", login=False, token=False)
        self.tool("--init-pin", "--pin", "env:CERTROTATE_TEST_PIN", so=True)

    def objects(self) -> list[tuple[str, str, str]]:
        """(class, id, label) of every object in the token, sorted."""
        return parse_objects(self.tool("--list-objects").stdout)

    def public_key_der(self, key_id: str) -> bytes:
        out = self.dir / f"pub-{key_id}.der"
        self.tool("--read-object", "--type", "pubkey", "--id", key_id, "--output-file", str(out))
        return out.read_bytes()

    def cert_file(self, cert_id: str) -> Path:
        """The certificate at ``cert_id``, read out of the token into a DER file."""
        out = self.dir / f"cert-{cert_id}.der"
        self.tool("--read-object", "--type", "cert", "--id", cert_id, "--output-file", str(out), login=False)
        return out

    def cert_der(self, cert_id: str) -> bytes:
        return self.cert_file(cert_id).read_bytes()

    def openssl_env(self) -> dict:
        """The environment for `openssl` with pkcs11-provider on this token (PIN in a 0600 file)."""
        pin = self.dir / "pin"
        pin.write_text(USER_PIN)
        pin.chmod(0o600)
        conf = self.dir / "openssl.cnf"
        conf.write_text(
            # Not "[default]": that name is OpenSSL's section for values outside any section.
            "openssl_conf = conf_sect\n[conf_sect]\nproviders = provider_sect\n[provider_sect]\n"
            "default = default_sect\npkcs11 = pkcs11_sect\n[default_sect]\nactivate = 1\n[pkcs11_sect]\n"
            f"pkcs11-module-path = {self.module}\npkcs11-module-token-pin = file:{pin}\n"
            "pkcs11-module-quirks = no-deinit\nactivate = 1\n"
        )
        return {**os.environ, **self.env, "OPENSSL_CONF": str(conf)}

    def snapshot(self, directory: Path) -> "SoftHsm":
        """A copy of this token as it is now (a second token with the same objects)."""
        copy = SoftHsm(directory)
        shutil.rmtree(copy.tokens)
        shutil.copytree(self.tokens, copy.tokens)
        return copy


def parse_objects(listing: str) -> list[tuple[str, str, str]]:
    """(class, id, label) of each object `pkcs11-tool --list-objects` printed, sorted."""
    found = []
    for block in re.split(r"\n(?=\S)", listing):
        kind = re.match(r"(Private Key|Public Key|Certificate|Secret Key|Data) Object", block)
        if not kind:
            continue
        label = re.search(r"label:\s*(.*)", block)
        ident = re.search(r"ID:\s*(\S+)", block)
        found.append((kind.group(1), ident.group(1) if ident else "", label.group(1).strip() if label else ""))
    return sorted(found)


def register_token_device(backend, hsm: SoftHsm, name: str, out: Path, *register_args: str,
                          derive: bool = True, key_copies: tuple[str, ...] = ()) -> Path:
    """Register ``name`` with its identity in ``hsm``, as lmp-device-register does.

    ``derive`` False makes a key that cannot do ECDH (as tpm2-pkcs11 before 1.9.1).
    ``key_copies`` imports one software-made key at id 01 and at each of these ids
    instead (a token provisioned twice)."""
    hsm.init_token()
    usage = ["--usage-sign"] + (["--usage-derive"] if derive else [])
    if key_copies:
        key = hsm.dir / "imported.der"
        public = hsm.dir / "imported-public.der"
        subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-outform", "DER", "-out", str(key)], check=True, capture_output=True, timeout=60)
        subprocess.run(["openssl", "pkey", "-inform", "DER", "-in", str(key), "-pubout", "-outform", "DER",
                        "-out", str(public)], check=True, capture_output=True, timeout=60)
        for key_id in ("01", *key_copies):
            hsm.tool("--write-object", str(key), "--type", "privkey", "--id", key_id, "--label", "tls", *usage)
            hsm.tool("--write-object", str(public), "--type", "pubkey", "--id", key_id, "--label", "tls")
        key.unlink()
    else:
        hsm.tool("--keypairgen", "--key-type", "EC:prime256v1", "--id", "01", "--label", "tls", *usage)
    csr = hsm.dir / f"{name}.csr"
    subprocess.run(
        ["openssl", "req", "-new", "-key", f"pkcs11:token={TOKEN_LABEL};id=%01;type=private",
         "-subj", f"/CN={name}", "-sha256", "-out", str(csr)],
        check=True, capture_output=True, env=hsm.openssl_env(), timeout=60,
    )
    device = backend.register(name, out, "--csr", str(csr), *register_args)
    sota = device / "var/sota"
    cert_der = hsm.dir / f"{name}.der"
    subprocess.run(["openssl", "x509", "-in", str(sota / "client.pem"), "-outform", "DER", "-out", str(cert_der)],
                   check=True, capture_output=True, timeout=60)
    hsm.tool("--write-object", str(cert_der), "--type", "cert", "--id", "03", "--label", "client")
    (sota / "client.pem").unlink()
    text = (sota / "sota.toml").read_text()
    text = text.replace('pkey_source = "file"', 'pkey_source = "pkcs11"')
    text = text.replace('cert_source = "file"', 'cert_source = "pkcs11"')
    text = re.sub(r'tls_clientcert_path = .*\n|tls_pkey_path = .*\n', "", text)
    # What lmp-device-register appends (it writes no label: aktualizr's default is "aktualizr").
    text += f'\n[p11]\nmodule = "{hsm.module}"\npass = "{USER_PIN}"\ntls_pkey_id = "01"\ntls_clientcert_id = "03"\n'
    (sota / "sota.toml").write_text(text)
    return device


def gateway_get(backend, hsm: SoftHsm, key_id: str, cert_file: Path, path: str = "/device") -> tuple[str, str]:
    """The status line and body the gateway answers GET ``path`` with, over mutual TLS
    as the token key ``key_id`` and ``cert_file``, by `openssl s_client`; ("", "") when TLS fails."""
    host_port = backend.gateway_url.split("://", 1)[1].split("/", 1)[0]
    request = f"GET {path} HTTP/1.1\r\nHost: {host_port}\r\nConnection: close\r\n\r\n"
    done = subprocess.run(
        ["openssl", "s_client", "-quiet", "-connect", host_port, "-servername", host_port.rsplit(":", 1)[0],
         "-CAfile", str(backend.root_ca), "-cert", str(cert_file),
         "-key", f"pkcs11:token={TOKEN_LABEL};id=%{key_id};type=private", "-verify_return_error"],
        input=request, capture_output=True, text=True, env=hsm.openssl_env(), timeout=60,
    )
    if not done.stdout:
        return "", ""
    head, _, body = done.stdout.partition("\n\n")  # text mode made each CRLF a newline
    return head.splitlines()[0].strip(), body


class DerivingKey:
    """The token key ``key_id`` as certrotate.ecies sees a private key: its ECDH is
    pkcs11-tool's --derive (CKM_ECDH1_DERIVE) inside the token."""

    def __init__(self, hsm: SoftHsm, key_id: str):
        from cryptography.hazmat.primitives.serialization import load_der_public_key

        self.hsm = hsm
        self.key_id = key_id
        self.curve = load_der_public_key(hsm.public_key_der(key_id)).curve

    def exchange(self, algorithm, peer_public_key) -> bytes:
        from cryptography.hazmat.primitives import serialization

        peer = self.hsm.dir / "peer.der"
        peer.write_bytes(peer_public_key.public_bytes(serialization.Encoding.DER,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
        out = self.hsm.dir / "shared.bin"
        self.hsm.tool("--derive", "-m", "ECDH1-DERIVE", "--id", self.key_id, "--input-file", str(peer),
                      "--output-file", str(out))
        return out.read_bytes()
