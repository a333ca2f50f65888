"""Rotation requests over time: one arriving mid-rotation, and an EST server that says wait."""

from __future__ import annotations

import json
import re
import signal
import time

import pytest

from agentdevice import assert_rotated, event_lines, fake_systemctl, new_device, run_agent
from backend import Backend
from certrotate import cli
from certrotate.systemd import Systemd

pytestmark = pytest.mark.timeout(180)


def test_request_during_a_rotation_does_not_clobber_it(backend, tmp_path):
    device, old = new_device(backend, tmp_path, "dev-s")
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)
    killed = run_agent(device, "rotate", "--rotation-id", "certs-100", bin_dir=bin_dir,
                       env={"CERTROTATE_CRASH_AT": "journal:lock"})
    assert killed.returncode == -signal.SIGKILL

    config_file = tmp_path / "fio-rotate-certs"
    config_file.write_text(f"ESTSERVER={backend.est_url}\nROTATIONID=certs-200\n")
    handler = run_agent(device, "handler", bin_dir=bin_dir, env={"CONFIG_FILE": str(config_file)})
    assert handler.returncode == 0, handler.stderr
    assert "finishing certs-100 first" in handler.stderr
    assert_rotated(backend, device, old, device_values={}, local_values=None)
    assert "CertRotationCompleted" in event_lines(backend, "dev-s", "certs-100")[-1]
    state = json.loads((device / "var/sota/certrotate/state.json").read_text())
    assert [(c["rotation_id"], c.get("satisfied_by")) for c in state["completed"]] == [
        ("certs-100", None), ("certs-200", "certs-100")]

    # The request that arrived meanwhile is satisfied: it does not rotate again.
    key_files = sorted(p.name for p in (device / "var/sota").glob("pkey*"))
    again = run_agent(device, "handler", bin_dir=bin_dir, env={"CONFIG_FILE": str(config_file)})
    assert again.returncode == 0 and "certs-200 already completed" in again.stderr
    assert sorted(p.name for p in (device / "var/sota").glob("pkey*")) == key_files


class FakeTime:
    """A clock (wall and monotonic) that sleeping moves forward, so the EST wait bound
    passes instantly."""

    def __init__(self):
        self.now = time.time()
        self.slept = []

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


def test_est_server_asking_to_wait_is_exit_4_then_resumes(tmp_path, capsys):
    backend = Backend(tmp_path / "factory", "--manual-approval", "--retry-after", "60")
    backend.start()
    try:
        device, old = new_device(backend, tmp_path, "dev-w")
        bin_dir = tmp_path / "bin"
        systemd = Systemd(str(fake_systemctl(bin_dir)))
        fake = FakeTime()
        code = cli.main(["--root", str(device), "rotate", "--rotation-id", "certs-300"],
                        clock=fake.clock, sleep=fake.sleep, systemd=systemd, monotonic=fake.clock)
        assert code == cli.EXIT_WAITING
        err = capsys.readouterr().err
        assert "Generate new certificate" in err and "what to do:" in err
        assert fake.slept and all(s == 60 for s in fake.slept)
        assert sum(fake.slept) <= 900

        listing = backend.cli("est", "requests").stdout
        ids = re.findall(r"^\s*(\d+)\b", listing, re.MULTILINE)
        assert ids, listing
        backend.cli("est", "approve", *ids)
        code = cli.main(["--root", str(device), "rotate"], systemd=systemd)
        assert code == cli.EXIT_DONE, capsys.readouterr().err
        assert_rotated(backend, device, old, device_values={}, local_values=None)
    finally:
        backend.stop()


def test_new_est_server_replaces_a_dead_one_before_the_certificate_is_issued(backend, tmp_path, capsys):
    device, old = new_device(backend, tmp_path, "dev-r")
    systemd = Systemd(str(fake_systemctl(tmp_path / "bin")))
    dead = "https://127.0.0.1:9/.well-known/est"  # discard port: nothing listens
    code = cli.main(["--root", str(device), "rotate", "--rotation-id", "certs-400", "--est-server", dead],
                    sleep=lambda seconds: None, systemd=systemd)
    assert code == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "Generate new certificate" in err and "what to do:" in err

    code = cli.main(["--root", str(device), "rotate", "--est-server", backend.est_url], systemd=systemd)
    err = capsys.readouterr().err
    assert code == cli.EXIT_DONE, err
    assert f"EST server changed from {dead} to {backend.est_url}" in err
    assert_rotated(backend, device, old, device_values={}, local_values=None)


@pytest.mark.bad_input("clock that cannot be right")
def test_a_request_on_a_wrong_clock_waits_for_the_clock_then_completes(backend, tmp_path, capsys, monkeypatch):
    """Booted without an RTC: fioconfig hands over a rotation at 1970. It is journaled
    (its one handler call must not be lost) but nothing runs; once NTP has set the
    clock, the timer's next `check` carries it out."""
    device, old = new_device(backend, tmp_path, "dev-c")
    systemd = Systemd(str(fake_systemctl(tmp_path / "bin")))
    config_file = tmp_path / "fio-rotate-certs"
    config_file.write_text(f"ESTSERVER={backend.est_url}\nROTATIONID=certs-500\n")
    monkeypatch.setenv("CONFIG_FILE", str(config_file))
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    code = cli.main(["--root", str(device), "handler"], clock=lambda: 0.0, systemd=systemd)
    err = capsys.readouterr().err
    assert code == cli.EXIT_WRONG_CLOCK, err
    assert "the clock reads 1970-01-01T00:00:00Z" in err and "resuming" not in err
    state = json.loads((device / "var/sota/certrotate/state.json").read_text())
    assert state["current"]["rotation_id"] == "certs-500" and state["current"]["step"] == 0
    assert old.key_pem == (device / "var/sota/pkey.pem").read_bytes()
    assert backend.gateway(device, "GET", "/device").json()["next_pubkey"] is None  # nothing sent

    # Still 1970 at the next timer run: still nothing.
    assert cli.main(["--root", str(device), "check"], clock=lambda: 0.0, systemd=systemd) == cli.EXIT_WRONG_CLOCK
    # The clock jumps forward (NTP): the next run completes the journaled rotation.
    assert cli.main(["--root", str(device), "check"], systemd=systemd) == cli.EXIT_DONE, capsys.readouterr().err
    assert_rotated(backend, device, old, device_values={}, local_values=None)
