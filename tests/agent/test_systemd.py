import pytest

from certrotate.systemd import Systemd, SystemdError


def fake(tmp_path, restart_status=0, states=None):
    """A systemctl that answers is-active like the real one: one state a line per unit,
    exit 0 when one of them is active; ``states`` replaces that output."""
    script = tmp_path / "systemctl"
    log = tmp_path / "calls"
    is_active = (
        f"printf '{states}'; exit 0" if states is not None else
        'shift; s=3; for u in "$@"; do if [ "$u" = a.service ]; then echo active; s=0; '
        'elif [ "$u" = r.service ]; then echo reloading; s=0; else echo inactive; fi; done; exit $s'
    )
    script.write_text(
        f'#!/bin/sh\necho "$*" >> {log}\n'
        f'case "$1" in is-active) {is_active} ;;\n'
        f'  restart) echo "unit failed" >&2; exit {restart_status} ;; esac\nexit 1\n'
    )
    script.chmod(0o755)
    return Systemd(str(script)), log


def test_active_and_restart(tmp_path):
    systemd, log = fake(tmp_path)
    assert systemd.active(["a.service", "b.service", "r.service"]) == ["a.service", "r.service"]
    assert systemd.active(["b.service"]) == []
    assert systemd.active([]) == []
    systemd.restart(["a.service"])
    systemd.restart([])
    # One systemctl call per question, none when there is nothing to ask.
    assert log.read_text().splitlines() == [
        "is-active a.service b.service r.service", "is-active b.service", "restart a.service"]


def test_unexpected_is_active_output_is_an_error(tmp_path):
    systemd, _ = fake(tmp_path, states="active\\n")
    with pytest.raises(SystemdError, match="one state per unit") as err:
        systemd.active(["a.service", "b.service"])
    assert "systemctl is-active" in err.value.hint


def test_systemd_not_answering_is_an_error_quoting_it(tmp_path):
    script = tmp_path / "systemctl"
    script.write_text('#!/bin/sh\necho "Failed to connect to bus: Host is down" >&2\nexit 1\n')
    script.chmod(0o755)
    with pytest.raises(SystemdError, match="Failed to connect to bus"):
        Systemd(str(script)).active(["a.service"])


def test_restart_failure_says_what_to_do(tmp_path):
    systemd, _ = fake(tmp_path, restart_status=5)
    with pytest.raises(SystemdError, match="unit failed") as err:
        systemd.restart(["a.service"])
    assert "journalctl" in err.value.hint


def test_missing_systemctl(tmp_path):
    with pytest.raises(SystemdError, match="not found"):
        Systemd(str(tmp_path / "nope")).active(["a.service"])
