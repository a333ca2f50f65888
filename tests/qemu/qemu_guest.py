"""A provisioned test device running in QEMU, and what tests ask of it."""

from __future__ import annotations

import json
import shlex
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from qemu_image import provision_over_ssh
from qemu_timing import record_stage, stage
from qemu_vm import HOST_FROM_GUEST, VM

# certrotate.service may write only below /var/sota (ProtectSystem=strict);
# the test's trace and pause files get a directory of their own.
TEST_DIR = "/var/lib/certrotate-qemu-test"
PAUSE_NOTIFY = f"{TEST_DIR}/paused"
DROPIN = "/etc/systemd/system/certrotate.service.d/qemu-test.conf"
STANDIN_STATUS = "/run/sota-standin/{}.json"


def guest_urls(backend) -> list[str]:
    """`devices register` options naming the backend as the guest reaches it
    (the host's loopback is 10.0.2.2 under user networking)."""
    return ["--gateway-url", backend.gateway_url.replace("127.0.0.1", HOST_FROM_GUEST),
            "--est-url", guest_est_url(backend)]


def guest_est_url(backend) -> str:
    return backend.est_url.replace("127.0.0.1", HOST_FROM_GUEST)


@dataclass
class Identity:
    """A device identity: its paths on the device and copies on the host."""

    key_path: str
    cert_path: str
    key: Path
    cert: Path


class Guest:
    """One device: its disk and VM, and its registration with ``backend``.
    With ``provision_tree`` (image mode) the disk carries no identity yet: the
    first boot installs that device tree over ssh."""

    def __init__(self, name: str, vm: VM, backend, provision_tree: Path | None = None):
        self.name = name
        self.vm = vm
        self.backend = backend
        self.provision_tree = provision_tree

    # -- power ---------------------------------------------------------------

    def boot(self, why: str) -> None:
        self.vm.start()
        waited = self.vm.wait_ssh()
        record_stage(f"{self.name}: boot {self.vm.boots} to ssh ({why})", waited)
        if self.provision_tree is not None and self.vm.boots == 1:
            with stage(f"{self.name}: provision over ssh"):
                provision_over_ssh(self.vm, self.provision_tree, TEST_DIR, self.vm.workdir)

    def power_cut(self) -> None:
        self.vm.power_cut()

    def shutdown(self) -> None:
        self.vm.shutdown()

    def ssh(self, command: str, check: bool = True, timeout: float = 300):
        return self.vm.ssh(command, check=check, timeout=timeout)

    # -- identity as the device sees it -------------------------------------

    def sota(self) -> dict:
        return tomllib.loads(self.vm.read("/var/sota/sota.toml"))

    def identity_paths(self) -> tuple[str, str]:
        """(key, cert) device paths that sota.toml names now."""
        imports = self.sota()["import"]
        return imports["tls_pkey_path"], imports["tls_clientcert_path"]

    def identity(self, workdir: Path) -> Identity:
        """The key and certificate sota.toml names, copied to ``workdir`` on the host."""
        key_path, cert_path = self.identity_paths()
        workdir.mkdir(parents=True, exist_ok=True)
        key, cert = workdir / "key.pem", workdir / "cert.pem"
        key.write_text(self.vm.read(key_path))
        key.chmod(0o600)
        cert.write_text(self.vm.read(cert_path))
        return Identity(key_path, cert_path, key, cert)

    def status(self) -> dict:
        return json.loads(self.ssh("certrotate status --json").stdout)

    # -- the stand-ins -------------------------------------------------------

    def standin(self, name: str = "aktualizr-lite") -> dict | None:
        result = self.ssh(f"cat {STANDIN_STATUS.format(name)}", check=False)
        return json.loads(result.stdout) if result.returncode == 0 and result.stdout else None

    def wait_standin_ok(self, cert_path: str, since: float | None = None, name: str = "aktualizr-lite",
                        timeout: float = 120) -> dict:
        """Wait until the stand-in reached the gateway with ``cert_path``
        (and, with ``since``, in a request made after that guest time)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.standin(name)
            if last and last["ok"] and last["cert"] == cert_path and (since is None or last["time"] > since):
                return last
            time.sleep(2)
        raise AssertionError(f"{self.name}: {name} stand-in not online with {cert_path} within {timeout} s; "
                             f"last status: {last}; journal:\n{self.journal(name + '.service')}")

    def guest_time(self) -> float:
        return float(self.ssh("date +%s.%N").stdout)

    # -- the agent under systemd ---------------------------------------------

    def set_agent_environment(self, **env: str) -> None:
        """Give certrotate.service this test environment (a drop-in), or none."""
        if env:
            lines = "".join(f"Environment={k}={v}\n" for k, v in env.items())
            dropin = f"[Service]\nReadWritePaths={TEST_DIR}\n{lines}"
            self.ssh(f"mkdir -p {TEST_DIR} $(dirname {DROPIN}) && "
                     f"printf %s {shlex.quote(dropin)} > {DROPIN} && systemctl daemon-reload")
        else:
            self.ssh(f"rm -f {DROPIN} && systemctl daemon-reload")

    def pause_agent_at(self, point: str, timeout: float = 600) -> None:
        """Start certrotate.service and wait until the agent sleeps at crash point ``point``
        (the caller then cuts the power)."""
        self.set_agent_environment(CERTROTATE_PAUSE_AT=point, CERTROTATE_PAUSE_NOTIFY=PAUSE_NOTIFY)
        self.ssh(f"rm -f {PAUSE_NOTIFY} && sync && systemctl start --no-block certrotate.service")
        self.vm.wait_for(f"grep -qx {point} {PAUSE_NOTIFY}", timeout=timeout)

    def run_certrotate_service(self, timeout: float = 600):
        """``systemctl start certrotate.service`` (oneshot: returns when the agent exits)."""
        return self.ssh("systemctl start certrotate.service", check=False, timeout=timeout)

    def journal(self, unit: str = "certrotate.service") -> str:
        return self.ssh(f"journalctl -b --no-pager -o cat -u {unit} | tail -n 60", check=False).stdout

    def deliver_config(self):
        """What fioconfig does on a config change: fetch /config and run the
        on-changed handlers, here as a transient systemd service."""
        return self.ssh("systemd-run --quiet --wait --pipe --collect --unit=fioconfig-apply "
                        "/usr/local/bin/sota-client-standin --name fioconfig --apply-config /run/secrets",
                        check=False, timeout=600)
