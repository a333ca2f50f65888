"""The factory directory: PKI files, settings, and the device trees it registers.

Layout of DIR:
  factory.json        settings (no secrets but the EST password's scrypt hash)
  root.crt/.key       root CA (~30 y); .key only when created here, 0600
  device-ca.crt/.key  online device CA (~25 y) used by EST and registration
  gateway.crt/.key    TLS server certificate of the device gateway (and, during
                      a root CA rollover, the NewWithOld cross-certificate)
  est.crt/.key        TLS server certificate of the EST server (likewise)
  previous-*, cross-*, retired/  a root CA rollover's (rollover.py)
  est-password        the generated EST HTTP Basic password, 0600
  certrotate.db       SQLite store
  endpoints.json      written by `serve` while it runs
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from . import pki

DEFAULT_FACTORY = "certrotate-factory"
# 10.0.2.2 is the host as seen from a QEMU guest on user networking.
DEFAULT_HOSTNAMES = ["localhost", "127.0.0.1", "10.0.2.2"]
DEFAULT_EST_USER = "bootstrap"


class FactoryError(Exception):
    """The factory directory is missing, incomplete or asked to do something invalid."""


@dataclass
class EstSettings:
    username: str
    password_salt: str
    password_hash: str
    labels: list[str]
    manual_approval: bool
    retry_after: int
    b64_line_length: int  # 0 = one line
    validity_days: int
    max_body: int
    allow_csr_san: bool = False  # simpleenroll: issue a CSR's subjectAltName instead of refusing it
    # simplereenroll: days after notAfter during which an expired current certificate
    # still renews (a device shelved past its one-year certificate); 0: never.
    expired_renewal_days: int = 90
    _verified: bytes | None = field(default=None, repr=False)

    def password_known(self, password: str) -> bool:
        """True if `password` is the one already verified: no scrypt needed."""
        return self._verified is not None and hmac.compare_digest(
            hashlib.sha256(password.encode()).digest(), self._verified)

    def password_ok(self, password: str) -> bool:
        # scrypt costs 16 MiB and ~50 ms: remember the password once verified, so a
        # burst of enrollments does not run it per request.
        if self.password_known(password):
            return True
        if hmac.compare_digest(_scrypt(password, self.password_salt), self.password_hash):
            self._verified = hashlib.sha256(password.encode()).digest()
            return True
        return False


def _scrypt(password: str, salt_hex: str) -> str:
    return hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt_hex), n=2**14, r=8, p=1).hex()


class Factory:
    def __init__(self, path: Path):
        self.dir = Path(path)
        settings_file = self.dir / "factory.json"
        if not settings_file.exists():
            raise FactoryError(
                f"{self.dir} is not a factory directory (no factory.json); "
                f"run `certrotate-server init --dir {self.dir}` first"
            )
        self.settings = json.loads(settings_file.read_text())
        self.name: str = self.settings["name"]
        est = self.settings["est"]
        self.est = EstSettings(**est)
        self._device_ca = None

    # Paths -----------------------------------------------------------------
    @property
    def db_path(self) -> Path:
        return self.dir / "certrotate.db"

    @property
    def endpoints_path(self) -> Path:
        return self.dir / "endpoints.json"

    def path(self, name: str) -> Path:
        return self.dir / name

    # PKI -------------------------------------------------------------------
    @property
    def generation(self) -> int:
        """1 for the root init made; one more with each `ca rollover`."""
        return self.settings.get("ca", {}).get("generation", 1)

    @property
    def in_transition(self) -> bool:
        """Between `ca rollover` and `ca retire-old`: both roots and device CAs are trusted."""
        return self.settings.get("ca", {}).get("transition", False)

    def root_cert(self) -> x509.Certificate:
        return pki.load_cert(self.path("root.crt"))

    def device_ca_files(self) -> list[Path]:
        """The CAs whose device certificates the gateway and EST accept."""
        names = ["device-ca.crt"] + (["previous-device-ca.crt"] if self.in_transition else [])
        return [self.path(name) for name in names]

    def cacerts(self) -> list[x509.Certificate]:
        """What /cacerts serves: the issuing device CA and the root, and during a rollover
        RFC 7030 4.1.3's NewWithOld, OldWithNew and OldWithOld beside NewWithNew (the new
        root). A PKCS#7 certificate set has no order: clients tell them apart by content."""
        names = ["device-ca.crt", "root.crt"]
        if self.in_transition:
            # NewWithOld before NewWithNew: agents before 4f6c1bf take the first certificate of
            # a name when they look for a CA, and only NewWithOld leads to the old root.
            names = ["device-ca.crt", "cross-new-with-old.crt", "root.crt", "cross-old-with-new.crt",
                     "previous-root.crt"]
        return [pki.load_cert(self.path(name)) for name in names]

    def trust_bundle(self) -> bytes:
        """The roots a device is to trust now (its root.crt): the new one first."""
        names = ["root.crt"] + (["previous-root.crt"] if self.in_transition else [])
        return b"".join(self.path(name).read_bytes() for name in names)

    def device_ca(self):
        """(certificate, key) of the online device CA, loaded once."""
        if self._device_ca is None:
            self._device_ca = (
                pki.load_cert(self.path("device-ca.crt")),
                pki.load_key(self.path("device-ca.key")),
            )
        return self._device_ca

    def issue_initial_device_cert(self, device: str, public_key, san_names: list[str] = ()) -> x509.Certificate:
        """lmp-device-register's shape: CN=device, OU=factory; a SAN only when asked for."""
        ca_cert, ca_key = self.device_ca()
        return pki.issue_device_cert(
            pki.device_subject(device, self.name),
            pki.dns_san(list(san_names)),
            public_key,
            ca_cert,
            ca_key,
            pki.INITIAL_DEVICE_DAYS,
        )

    def set_est_setting(self, name: str, value) -> None:
        """Change one EST setting in factory.json (a running `serve` reads it when restarted)."""
        self.settings["est"][name] = value
        self.est = EstSettings(**self.settings["est"])
        pki.write_public(self.dir / "factory.json", (json.dumps(self.settings, indent=2) + "\n").encode())

    def endpoints(self) -> dict | None:
        try:
            return json.loads(self.endpoints_path.read_text())
        except FileNotFoundError:
            return None


def init_factory(
    path: Path,
    name: str = DEFAULT_FACTORY,
    hostnames: list[str] | None = None,
    root_cert_file: Path | None = None,
    root_key_file: Path | None = None,
    est_user: str = DEFAULT_EST_USER,
    est_password: str | None = None,
    est_labels: list[str] | None = None,
    manual_approval: bool = False,
    retry_after: int = 30,
    b64_line_length: int = 64,
    validity_days: int = 365,
    max_body: int = 64 * 1024,
    allow_csr_san: bool = False,
    expired_renewal_days: int = 90,
) -> Factory:
    path = Path(path)
    if (path / "factory.json").exists():
        raise FactoryError(f"{path} already holds a factory (factory.json); use another --dir")
    if bool(root_cert_file) != bool(root_key_file):
        raise FactoryError("importing a root CA needs both --root-ca-cert and --root-ca-key")
    if validity_days < 1:
        raise FactoryError("--validity-days must be at least 1")
    if expired_renewal_days < 0:
        raise FactoryError("--expired-renewal-days must be 0 (never) or more")
    if retry_after < 1:
        # Clients resend at once on a Retry-After of 0 (certrotate waits a second at least).
        raise FactoryError(f"--retry-after must be at least 1 second, not {retry_after}: "
                           "it is how long devices wait before asking again for a pending enrollment")
    make_dirs(path, 0o700)
    os.chmod(path, 0o700)
    hostnames = hostnames or list(DEFAULT_HOSTNAMES)

    if root_cert_file:
        root_cert = pki.load_cert(Path(root_cert_file))
        root_key = pki.load_key(Path(root_key_file))
        if pki.pubkey_der(root_cert.public_key()) != pki.pubkey_der(root_key.public_key()):
            raise FactoryError(f"{root_key_file} is not the key of {root_cert_file}")
        try:
            if not root_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                raise FactoryError(f"{root_cert_file} is not a CA certificate")
        except x509.ExtensionNotFound:
            raise FactoryError(f"{root_cert_file} has no BasicConstraints; not a CA") from None
    else:
        root_key = pki.new_key()
        root_cert = pki.make_root_ca(name, root_key)
        pki.write_private(path / "root.key", pki.key_pem(root_key))
    pki.write_public(path / "root.crt", pki.cert_pem(root_cert))

    ca_key = pki.new_key()
    pki.write_private(path / "device-ca.key", pki.key_pem(ca_key))
    pki.write_public(path / "device-ca.crt", pki.cert_pem(pki.make_device_ca(name, ca_key, root_cert, root_key)))

    write_tls_server_certs(path, name, hostnames, root_cert, root_key)

    if est_password is None:
        est_password = secrets.token_urlsafe(18)
        pki.write_private(path / "est-password", (est_password + "\n").encode())
    salt = secrets.token_hex(16)
    settings = {
        "name": name,
        "hostnames": hostnames,
        "est": {
            "username": est_user,
            "password_salt": salt,
            "password_hash": _scrypt(est_password, salt),
            "labels": list(est_labels or []),
            "manual_approval": manual_approval,
            "retry_after": retry_after,
            "b64_line_length": b64_line_length,
            "validity_days": validity_days,
            "max_body": max_body,
            "allow_csr_san": allow_csr_san,
            "expired_renewal_days": expired_renewal_days,
        },
    }
    pki.write_public(path / "factory.json", (json.dumps(settings, indent=2) + "\n").encode())
    return Factory(path)


def write_tls_server_certs(directory: Path, name: str, hostnames: list[str], root_cert, root_key,
                           chain: list[x509.Certificate] = ()) -> None:
    """gateway.crt/.key and est.crt/.key, signed by the root; each .crt is the TLS chain:
    the leaf, then ``chain`` (devices trust the root, which signed the leaf)."""
    for role in ("gateway", "est"):
        key = pki.new_key()
        cert = pki.make_tls_server_cert(f"{name} {role}", hostnames, key, root_cert, root_key)
        pki.write_private(directory / f"{role}.key", pki.key_pem(key))
        pki.write_public(directory / f"{role}.crt", b"".join(pki.cert_pem(c) for c in [cert, *chain]))


SOTA_TOML = """\
[tls]
server = "{gateway}"
ca_source = "file"
pkey_source = "file"
cert_source = "file"

[provision]
primary_ecu_hardware_id = "{hardware_id}"

[uptane]
repo_server = "{gateway}/repo"
key_source = "file"

[pacman]
type = "ostree"
tags = "main"

[storage]
type = "sqlite"
path = "/var/sota/"

[import]
base_path = "/var/sota"
tls_cacert_path = "/var/sota/root.crt"
tls_clientcert_path = "/var/sota/client.pem"
tls_pkey_path = "/var/sota/pkey.pem"
"""

CERTROTATE_TOML = """\
[est]
server = "{est}"
label = "{label}"
"""


def make_dirs(path: Path, mode: int, parents_mode: int = 0o755) -> None:
    """mkdir -p with explicit modes: `mode` for `path`, `parents_mode` for the parents
    it creates, whatever the caller's umask. Existing directories are left as they are."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir()
        os.chmod(directory, mode if directory == missing[0] else parents_mode)


def _toml_string(value: str) -> str:
    if any(c in value for c in '"\\\n'):
        raise FactoryError(f"URL {value!r} contains characters not allowed in a TOML string")
    return value


def write_device_tree(
    factory: Factory,
    out: Path,
    gateway_url: str,
    est_url: str,
    key,
    cert: x509.Certificate,
    hardware_id: str = "intel-corei7-64",
    label: str = "",
) -> None:
    """Write the device root filesystem of docs/contracts.md into `out`."""
    sota = out / "var" / "sota"
    etc = out / "etc" / "certrotate"
    make_dirs(sota, 0o700)  # aktualizr's own mode for its storage directory
    make_dirs(etc, 0o755)
    if key is not None:  # None: the device keeps its key itself (a token)
        pki.write_private(sota / "pkey.pem", pki.key_pem(key))
    pki.write_public(sota / "client.pem", pki.cert_pem(cert))
    pki.write_public(sota / "root.crt", factory.trust_bundle())
    pki.write_public(
        sota / "sota.toml",
        SOTA_TOML.format(gateway=_toml_string(gateway_url.rstrip("/")), hardware_id=hardware_id).encode(),
    )
    pki.write_public(
        etc / "certrotate.toml",
        CERTROTATE_TOML.format(est=_toml_string(est_url.rstrip("/")), label=_toml_string(label)).encode(),
    )
