"""Test harness: a real certrotate-server (init + serve as subprocesses) on loopback.

    backend = Backend(tmp_path / "factory")   # runs `certrotate-server init`
    backend.start()                           # free loopback ports; waits for endpoints.json
    device_root = backend.register("dev-1", tmp_path / "dev-1")
    backend.gateway(device_root, "GET", "/device")   # mTLS with the device's current key/cert
    backend.stop()                            # SIGTERM; backend.kill() for SIGKILL
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import requests

from children import spawn

START_TIMEOUT = 30

# The events of one complete rotation, in order (docs/contracts.md, "Rotation steps
# and event names"): what `devices updates NAME ID` must list.
ROTATION_EVENTS = [
    "CertRotationStarted",
    "Generate new certificate",
    "Lock device configuration on server",
    "Update local configuration with new key",
    "Update device specific configuration on server with new key",
    "Finalize aktualizr configuration",
    "Restart services",
    "Confirm new certificate with gateway",
    "Remove old key and certificate",
    "CertRotationCompleted",
]


def server_command() -> list[str]:
    script = Path(sys.executable).parent / "certrotate-server"
    return [str(script)] if script.exists() else [sys.executable, "-m", "certrotate_server.cli"]


def device_identity(device_root: Path) -> tuple[Path, Path]:
    """(key, cert) the device currently uses: sota.toml's import paths under device_root."""
    sota = tomllib.loads((Path(device_root) / "var/sota/sota.toml").read_text())
    imp = sota.get("import", {})
    key = imp.get("tls_pkey_path", "/var/sota/pkey.pem")
    cert = imp.get("tls_clientcert_path", "/var/sota/client.pem")
    base = imp.get("base_path", "/var/sota")
    resolve = lambda p: Path(device_root) / os.path.join(base, p).lstrip("/")  # noqa: E731
    return resolve(key), resolve(cert)


class Backend:
    def __init__(self, directory: Path, *init_args: str):
        self.dir = Path(directory)
        self.proc: subprocess.Popen | None = None
        self.gateway_url: str | None = None
        self.est_url: str | None = None
        self.log_path = self.dir.parent / f"{self.dir.name}-server.log"
        self.cli("init", *init_args)

    @property
    def root_ca(self) -> Path:
        return self.dir / "root.crt"

    @property
    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [*server_command(), *args, "--dir", str(self.dir)],
            capture_output=True, text=True, timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"certrotate-server {' '.join(args)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def start(self, gateway_port: int = 0, est_port: int = 0, workers: int = 1, *serve_args: str,
              prefix: tuple[str, ...] = ()) -> "Backend":
        """`serve_args` are more `serve` options; `prefix` runs serve under a command (e.g. prlimit)."""
        endpoints = self.dir / "endpoints.json"
        endpoints.unlink(missing_ok=True)
        log = open(self.log_path, "ab")
        self.proc = spawn(
            [*prefix, *server_command(), "serve", "--dir", str(self.dir),
             "--gateway-listen", f"127.0.0.1:{gateway_port}", "--est-listen", f"127.0.0.1:{est_port}",
             "--workers", str(workers), *serve_args],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"certrotate-server serve exited {self.proc.returncode}:\n{self.log}")
            try:
                info = json.loads(endpoints.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                time.sleep(0.05)
                continue
            if info.get("pid") == self.proc.pid:
                self.gateway_url, self.est_url = info["gateway"], info["est"]
                return self
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"certrotate-server serve did not write endpoints.json in {START_TIMEOUT}s:\n{self.log}")

    def restart(self) -> "Backend":
        """`serve` again on the same ports (devices name them); serve reads the CA files at start."""
        gateway, est = urlsplit(self.gateway_url).port, urlsplit(self.est_url).port
        self.stop()
        return self.start(gateway, est)

    def device_ca(self):
        """The factory's issuing CA as a tests/pki.py Authority, to sign what a test needs
        (a certificate that expired, one for a spare key)."""
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        from pki import Authority

        return Authority(load_pem_private_key((self.dir / "device-ca.key").read_bytes(), None),
                         x509.load_pem_x509_certificate((self.dir / "device-ca.crt").read_bytes()))

    def register(self, name: str, out: Path, *args: str) -> Path:
        self.cli("devices", "register", name, "--out", str(out), *args)
        return Path(out)

    def gateway(self, device_root: Path | None, method: str, path: str, key=None, cert=None, **kwargs) -> requests.Response:
        """One request over mutual TLS; key/cert default to the device's current ones."""
        if key is None or cert is None:
            default_key, default_cert = device_identity(device_root)
            key, cert = key or default_key, cert or default_cert
        kwargs.setdefault("timeout", 30)
        return requests.request(method, self.gateway_url + path, cert=(str(cert), str(key)),
                                verify=str(self.root_ca), **kwargs)

    def est(self, method: str, operation: str, key=None, cert=None, **kwargs) -> requests.Response:
        """One EST request; with key and cert, authenticated by that client certificate."""
        kwargs.setdefault("timeout", 30)
        client = (str(cert), str(key)) if cert and key else None
        return requests.request(method, f"{self.est_url}/{operation}", cert=client,
                                verify=str(self.root_ca), **kwargs)

    def stop(self, timeout: float = 15) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"certrotate-server did not stop on SIGTERM in {timeout}s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(15)
