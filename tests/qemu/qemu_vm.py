"""One QEMU guest booted from a GPT disk through OVMF, reached over ssh.

Software emulation only (``-accel tcg``): the CI machines have no VT-x, and
``-accel kvm`` hangs there. The disk sits on virtio-scsi as in LmP's own QEMU
instructions; user networking forwards a free host port to the guest's sshd,
and the guest reaches the host's loopback as 10.0.2.2.

A guest logs in with the suite's ssh key. A guest whose image does not carry
that key (image mode: a .wic from elsewhere) is logged in once with the
image's password, which installs the key, and, for a user that needs sudo,
lets that user run sudo without a password for the rest of the test.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from children import spawn

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")
HOST_FROM_GUEST = "10.0.2.2"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GuestCommandError(AssertionError):
    pass


@dataclass(frozen=True)
class Login:
    """How the guest lets the suite in: ``password`` None means the image
    already authorizes the suite's ssh key; ``sudo``: commands run through sudo."""

    user: str = "root"
    password: str | None = None
    sudo: bool = False

    @classmethod
    def parse(cls, user_password: str, sudo: bool = False) -> "Login":
        """``user:password`` as CERTROTATE_QEMU_LOGIN gives it."""
        user, colon, password = user_password.partition(":")
        if not user or not colon:
            raise ValueError(f"login {user_password!r} is not USER:PASSWORD "
                             "(set CERTROTATE_QEMU_LOGIN=fio:fio, or root: for an empty password)")
        return cls(user, password, sudo)


# Lets the login user run sudo without its password: every later command is
# non-interactive (ssh BatchMode, testinfra).
SUDOERS_DROPIN = "/etc/sudoers.d/certrotate-qemu-test"


class VM:
    """A guest on ``disk``; ``workdir`` keeps its firmware variables, console log and ssh files."""

    def __init__(self, disk: Path, workdir: Path, ssh_key: Path, login: Login = Login(),
                 disk_format: str = "raw"):
        self.disk = disk
        self.disk_format = disk_format
        self.workdir = workdir
        self.ssh_key = ssh_key
        self.login = login
        self.key_installed = login.password is None
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.vars = workdir / "OVMF_VARS.fd"
        if not self.vars.exists():
            shutil.copyfile(OVMF_VARS, self.vars)
        self.ssh_config = workdir / "ssh_config"
        self.host_alias = "guest"
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.boots = 0

    # -- power ---------------------------------------------------------------

    def start(self) -> None:
        """Power on (QEMU starts; use wait_ssh to wait for the guest)."""
        assert self.process is None, "already running"
        self.port = free_port()
        self._write_ssh_config()
        self.boots += 1
        command = [
            "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-smp", "2", "-m", "1024",
            "-no-reboot", "-display", "none", "-monitor", "none",
            "-serial", f"file:{self.console_log}",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={self.vars}",
            "-drive", f"file={self.disk},format={self.disk_format},if=none,id=hd,cache=writeback",
            "-device", "virtio-scsi-pci,id=scsi", "-device", "scsi-hd,drive=hd",
            "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{self.port}-:22",
            "-device", "virtio-net-pci,netdev=net0",
        ]
        self.process = spawn(command, stdin=subprocess.DEVNULL, stdout=open(self.workdir / "qemu.log", "ab"),
                             stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ssh(self, timeout: float = 300) -> float:
        """Wait until a real ssh command succeeds (user networking accepts
        TCP long before sshd runs); returns the seconds waited."""
        started = time.monotonic()
        port_retries = 2
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                if self._lost_ssh_port() and port_retries > 0:
                    port_retries -= 1
                    self.process = None
                    self.boots -= 1  # the same boot, on another port
                    self.start()
                    continue
                raise RuntimeError(f"QEMU exited ({self.process.returncode}) during boot; "
                                   f"console: {self.console_tail()}")
            try:
                probe = subprocess.run(self._ssh_args("-o", "ConnectTimeout=5", "true"),
                                       capture_output=True, timeout=30)
            except subprocess.TimeoutExpired:
                continue  # ConnectTimeout does not bound the login on a guest still booting
            if probe.returncode == 0:
                return time.monotonic() - started
            if not self.key_installed:
                self.key_installed = self._install_key_with_password()
                if self.key_installed:
                    continue
            time.sleep(1)
        if not self.key_installed:
            raise TimeoutError(f"no ssh login as {self.login.user} with the password after {timeout} s "
                               f"(check CERTROTATE_QEMU_LOGIN; last attempt: {self.workdir / 'password-login.log'}); "
                               f"console: {self.console_tail()}")
        raise TimeoutError(f"no ssh to the guest after {timeout} s; console: {self.console_tail()}")

    def _lost_ssh_port(self) -> bool:
        """QEMU could not bind the ssh port: free_port() released it and another
        socket took it before QEMU started."""
        log = (self.workdir / "qemu.log").read_text(errors="replace")
        return f"Could not set up host forwarding rule 'tcp:127.0.0.1:{self.port}-:22'" in log

    def power_cut(self) -> None:
        """SIGKILL QEMU: the guest loses its page cache, the disk keeps what QEMU wrote."""
        self._stop_ssh_master()
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
            self.process = None

    def shutdown(self, timeout: float = 120) -> None:
        """Clean poweroff; QEMU exits (-no-reboot). Falls back to a power cut on timeout."""
        if self.process is None:
            return
        subprocess.run(self._ssh_args(self._as_root("systemctl poweroff")), capture_output=True, timeout=60)
        self._stop_ssh_master()
        try:
            self.process.wait(timeout=timeout)
            self.process = None
        except subprocess.TimeoutExpired:
            self.power_cut()
            raise TimeoutError(f"guest did not power off within {timeout} s")

    # -- commands ------------------------------------------------------------

    def ssh(self, command: str, check: bool = True, timeout: float = 300,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run a shell command in the guest (``input``: its standard input)."""
        result = subprocess.run(self._ssh_args(self._as_root(command)), capture_output=True, text=True,
                                timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise GuestCommandError(f"guest command failed ({result.returncode}): {command}\n"
                                    f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}")
        return result

    def read(self, path: str) -> str:
        return self.ssh(f"cat {shlex.quote(path)}").stdout

    def wait_for(self, command: str, timeout: float, interval: float = 1.0) -> subprocess.CompletedProcess:
        """Re-run ``command`` in the guest until it succeeds."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.ssh(command, check=False)
            if result.returncode == 0:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest: `{command}` did not succeed within {timeout} s: "
                                   f"{result.stdout[-1000:]} {result.stderr[-1000:]}")
            time.sleep(interval)

    def testinfra_host(self):
        import testinfra

        return testinfra.get_host(f"ssh://{self.host_alias}", ssh_config=str(self.ssh_config),
                                  sudo=self.login.sudo)

    @property
    def console_log(self) -> Path:
        """The serial console of the current (or last) boot."""
        return self.workdir / f"console-{self.boots}.log"

    def console_tail(self, lines: int = 30) -> str:
        if not self.console_log.exists():
            return "(no console output)"
        return "\n".join(self.console_log.read_text(errors="replace").splitlines()[-lines:])

    # -- ssh plumbing --------------------------------------------------------

    def _write_ssh_config(self) -> None:
        # testinfra shares one connection only with a ControlPath set here.
        # Named by the boot's port, not ssh's 40-character %C: ssh binds the
        # master at the path plus 17 characters, within a socket path's 107.
        control_path = self.workdir / f"ssh-{self.port}"
        if len(str(control_path)) + 17 > 107:
            raise RuntimeError(f"ssh control socket path {control_path} is too long for a Unix socket; "
                               "set TMPDIR to a shorter directory")
        self.ssh_config.write_text(
            f"Host {self.host_alias}\n"
            f"  HostName 127.0.0.1\n  Port {self.port}\n  User {self.login.user}\n"
            f"  IdentityFile {self.ssh_key}\n  IdentitiesOnly yes\n  BatchMode yes\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
            f"  ControlMaster auto\n  ControlPath {control_path}\n  ControlPersist 120\n"
            "  ServerAliveInterval 10\n")

    def _ssh_args(self, *args: str) -> list[str]:
        return ["ssh", "-F", str(self.ssh_config), self.host_alias, *args]

    def _as_root(self, command: str) -> str:
        return f"sudo -n sh -c {shlex.quote(command)}" if self.login.sudo else command

    def _install_key_with_password(self) -> bool:
        """Log in with the password (ssh reads it from SSH_ASKPASS), authorize
        the suite's key and, for a sudo user, passwordless sudo. False while
        sshd is not up yet or refuses; the caller retries."""
        askpass = self.workdir / "askpass"
        askpass.write_text(f"#!/bin/sh\nprintf '%s\\n' {shlex.quote(self.login.password)}\n")
        askpass.chmod(0o700)
        public_key = self.ssh_key.with_suffix(".pub").read_text().strip()
        command = ("umask 077 && mkdir -p ~/.ssh && "
                   f"printf '%s\\n' {shlex.quote(public_key)} >> ~/.ssh/authorized_keys")
        if self.login.sudo:
            rule = f"{self.login.user} ALL=(ALL) NOPASSWD: ALL"
            command += (" && sudo -S -p '' sh -c " + shlex.quote(
                f"printf '%s\\n' {shlex.quote(rule)} > {SUDOERS_DROPIN} && chmod 0440 {SUDOERS_DROPIN}"))
        result = subprocess.run(
            ["ssh", "-F", str(self.ssh_config), "-o", "BatchMode=no", "-o", "PubkeyAuthentication=no",
             "-o", "PreferredAuthentications=password,keyboard-interactive", "-o", "NumberOfPasswordPrompts=1",
             "-o", "ControlMaster=no", "-o", "ControlPath=none", "-o", "ConnectTimeout=5",
             self.host_alias, command],
            input=self.login.password + "\n", capture_output=True, text=True, timeout=60,
            env={**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force"})
        (self.workdir / "password-login.log").write_text(f"exit {result.returncode}\n{result.stdout}{result.stderr}")
        return result.returncode == 0

    def _stop_ssh_master(self) -> None:
        subprocess.run(["ssh", "-F", str(self.ssh_config), "-O", "exit", self.host_alias],
                       capture_output=True, timeout=30)
