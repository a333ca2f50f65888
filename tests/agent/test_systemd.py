import pytest

from certrotate.systemd import Systemd, SystemdError


def fake(tmp_path, restart_status=0):
    script = tmp_path / "systemctl"
    log = tmp_path / "calls"
    script.write_text(
        f'#!/bin/sh\necho "$*" >> {log}\n'
        'case "$1" in is-active) [ "$3" = "a.service" ] && exit 0; exit 3 ;;\n'
        f'  restart) echo "unit failed" >&2; exit {restart_status} ;; esac\nexit 1\n'
    )
    script.chmod(0o755)
    return Systemd(str(script)), log


def test_is_active_and_restart(tmp_path):
    systemd, log = fake(tmp_path)
    assert systemd.is_active("a.service") is True
    assert systemd.is_active("b.service") is False
    systemd.restart(["a.service"])
    systemd.restart([])
    assert log.read_text().splitlines() == [
        "is-active --quiet a.service", "is-active --quiet b.service", "restart a.service"]


def test_restart_failure_says_what_to_do(tmp_path):
    systemd, _ = fake(tmp_path, restart_status=5)
    with pytest.raises(SystemdError, match="unit failed") as err:
        systemd.restart(["a.service"])
    assert "journalctl" in err.value.hint


def test_missing_systemctl(tmp_path):
    with pytest.raises(SystemdError, match="not found"):
        Systemd(str(tmp_path / "nope")).is_active("a.service")
