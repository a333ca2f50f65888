import datetime
import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from certrotate import cli
from pki import TestPki, write_device_tree

DAY = datetime.timedelta(days=1)


@pytest.fixture
def device(tmp_path):
    return write_device_tree(tmp_path / "dev", TestPki(), gateway_url="https://127.0.0.1:1",
                             est_url="https://127.0.0.1:1/.well-known/est")


def no_sleep(seconds):
    pass


def test_check_with_nothing_due_is_quiet_and_imports_nothing_heavy(device):
    # The trust anchors were checked today (anchors.json): only the certificate is judged.
    (device.state_dir / "anchors.json").write_text(json.dumps({"checked_at": time.time()}))
    probe = (
        "import sys\n"
        "from certrotate.cli import main\n"
        f"code = main(['--root', {str(device.root)!r}, 'check'])\n"
        "heavy = sorted(m for m in ('requests', 'cryptography', 'urllib3', 'ssl') if m in sys.modules)\n"
        "print(code, heavy)\n"
    )
    first = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert first.stdout.strip() == "0 ['cryptography']", first.stderr  # cache miss: parses the cert once
    second = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert (second.stdout.strip(), second.stderr) == ("0 []", "")
    assert device.state_dir.stat().st_mode & 0o777 == 0o700


def due_device(tmp_path):
    """A device whose certificate is due (300 of its 360 days elapsed); nothing listens
    at its gateway and EST URLs."""
    pki = TestPki()
    now = datetime.datetime.now(datetime.timezone.utc)
    old = pki.device(not_before=now - 300 * DAY, not_after=now + 60 * DAY)
    return write_device_tree(tmp_path / "dev", pki, identity=old, gateway_url="https://127.0.0.1:1",
                             est_url="https://127.0.0.1:1/.well-known/est")


def test_check_starts_a_rotation_when_due_and_reports_the_failing_step(tmp_path, capsys):
    device = due_device(tmp_path)
    code = cli.main(["--root", str(device.root), "check"], sleep=no_sleep)
    assert code == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "due for renewal" in err
    assert "step 'Generate new certificate' failed: EST simplereenroll: cannot connect to 127.0.0.1:1" in err
    assert "what to do:" in err
    state = json.loads((device.state_dir / "state.json").read_text())
    assert state["current"]["step"] == 1
    assert state["current"]["last_error"]["step"] == "Generate new certificate"
    # The key for the rotation exists, private, outside the journal.
    (key_file,) = device.state_dir.glob("*.key")
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert "PRIVATE KEY" not in (device.state_dir / "state.json").read_text()
    # The gateway (nothing listens on port 1) cannot take the events: they wait on disk,
    # and that did not change the outcome.
    queued = [json.loads(p.read_text()) for p in sorted((device.state_dir / "events").glob("*.json"))]
    assert [(e["eventType"]["id"], e["event"]["success"]) for e in queued] == [
        ("CertRotationStarted", True), ("Generate new certificate", False), ("CertRotationCompleted", False)]
    assert "events: 3 kept for a later run" in err
    # The next check resumes it (and fails the same way): nothing is started twice.
    assert cli.main(["--root", str(device.root), "check"], sleep=no_sleep) == cli.EXIT_FAILED
    assert "resuming at step 1" in capsys.readouterr().err
    assert list(device.state_dir.glob("*.key")) == [key_file]


def test_events_the_gateway_refuses_do_not_stop_a_due_renewal(tmp_path, capsys):
    from certrotate.events import EventQueue

    device = due_device(tmp_path)
    EventQueue(device.state_dir, clock=lambda: 0.0).queue(
        "CertRotationCompleted", "certs-1", success=True, point="test:event")
    code = cli.main(["--root", str(device.root), "check"], sleep=no_sleep)
    err = capsys.readouterr().err
    # Delivery failed (nothing listens on port 1), and the due rotation still started.
    assert "events: 1 kept for a later run" in err
    assert "due for renewal" in err
    assert code == cli.EXIT_FAILED
    assert json.loads((device.state_dir / "state.json").read_text())["current"]["step"] == 1


def test_missing_configuration_is_exit_2_with_a_hint(tmp_path, capsys):
    assert cli.main(["--root", str(tmp_path), "rotate"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "sota.toml" in err and "what to do: provision the device" in err


def test_rotate_without_est_server_is_exit_2(device, capsys):
    device.certrotate_toml.write_text("")
    assert cli.main(["--root", str(device.root), "rotate"]) == cli.EXIT_USAGE
    assert "no EST server configured" in capsys.readouterr().err
    assert json.loads((device.state_dir / "state.json").read_text() if (device.state_dir / "state.json").exists()
                      else '{"current": null}')["current"] is None


def test_unusable_state_dir_is_exit_2_naming_the_path(device, capsys):
    blocker = device.root / "var/sota/blocked"
    blocker.write_text("a file where the state directory belongs")
    device.certrotate_toml.write_text(
        device.certrotate_toml.read_text() + '\n[storage]\nstate_dir = "/var/sota/blocked"\n')
    assert cli.main(["--root", str(device.root), "rotate"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert str(blocker) in err and "what to do: check that path" in err
    assert "Traceback" not in err
    assert blocker.read_text() == "a file where the state directory belongs"


@pytest.mark.parametrize("rotation_id", ["../x", "certs-1\n"])
def test_bad_rotation_id_is_exit_2(device, capsys, rotation_id):
    assert cli.main(["--root", str(device.root), "rotate", "--rotation-id", rotation_id]) == cli.EXIT_USAGE
    assert f"rotation id {rotation_id!r} is not allowed" in capsys.readouterr().err


def test_lock_held_is_exit_3(device, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from certrotate.journal import Journal; "
         f"Journal({str(device.state_dir)!r}).lock(); print('ok', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ok"
        assert cli.main(["--root", str(device.root), "rotate"]) == cli.EXIT_LOCKED
        assert "another certrotate holds" in capsys.readouterr().err
    finally:
        holder.stdin.close()
        holder.wait(10)


@pytest.mark.parametrize("content, message", [
    (None, "CONFIG_FILE is not set"),
    ("ESTSERVER=https://x\n", "sets no ROTATIONID"),
])
def test_handler_needs_the_fio_rotate_certs_file(device, tmp_path, monkeypatch, capsys, content, message):
    monkeypatch.delenv("CONFIG_FILE", raising=False)
    if content is not None:
        path = tmp_path / "fio-rotate-certs"
        path.write_text(content)
        monkeypatch.setenv("CONFIG_FILE", str(path))
    assert cli.main(["--root", str(device.root), "handler"]) == cli.EXIT_USAGE
    assert message in capsys.readouterr().err


def test_status_text_and_json(device, capsys):
    assert cli.main(["--root", str(device.root), "status"]) == 0
    text = capsys.readouterr().out
    assert f"subject:   {device.identity.cert.subject.rfc4514_string()}" in text
    assert "rotation in progress: none" in text and "days left" in text
    assert cli.main(["--root", str(device.root), "status", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["certificate"]["serial"] == format(device.identity.cert.serial_number, "x")
    assert 363 < data["certificate"]["days_left"] <= 365
    assert data["rotation"] is None and data["queued_events"] == 0


def test_usage_error_is_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["frobnicate"])
    assert exit_info.value.code == 2


def test_a_run_removes_what_an_interrupted_write_left(device, capsys):
    leftovers = [device.sota / "pkey-certs-9.pem.certrotate-tmp",
                 device.state_dir / "certs-9.key.certrotate-tmp"]
    for path in leftovers:
        path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nhalf")
    assert cli.main(["--root", str(device.root), "rotate"], sleep=no_sleep) == cli.EXIT_FAILED
    assert not any(path.exists() for path in leftovers)
    assert "left by an interrupted write" in capsys.readouterr().err


class PlainListener:
    """A plain-TCP server on 127.0.0.1 that records whatever reaches it and hangs up."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.received: list[bytes] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopped.is_set():
            try:
                connection, _ = self.socket.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(2)
                try:
                    self.received.append(connection.recv(65536))
                    connection.sendall(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass

    def close(self):
        self.stopped.set()
        self.thread.join(5)
        self.socket.close()


@pytest.fixture
def plain_http():
    listener = PlainListener()
    yield listener
    listener.close()


@pytest.mark.bad_input("plain-http EST URL")
@pytest.mark.parametrize("source", ["--est-server", "ESTSERVER", "est.server"])
def test_plain_http_est_server_is_refused_before_anything_is_sent(source, device, plain_http, tmp_path,
                                                                  monkeypatch, capsys):
    url = f"http://127.0.0.1:{plain_http.port}/.well-known/est"
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    if source == "--est-server":
        command = ["rotate", "--est-server", url]
    elif source == "ESTSERVER":
        config_file = tmp_path / "fio-rotate-certs"
        config_file.write_text(f"ESTSERVER={url}\nROTATIONID=certs-1\n")
        monkeypatch.setenv("CONFIG_FILE", str(config_file))
        command = ["handler"]
    else:
        device.certrotate_toml.write_text(f'[est]\nserver = "{url}"\n')
        command = ["rotate"]
    code = cli.main(["--root", str(device.root), *command], sleep=no_sleep)
    err = capsys.readouterr().err
    assert plain_http.received == [], "the agent spoke plain HTTP to the EST server"
    assert code == cli.EXIT_USAGE, err
    assert f"{source}" in err and f"EST server URL {url!r} is not https" in err, err
    assert "what to do: use an https:// URL" in err
    state = device.state_dir / "state.json"
    assert not state.exists() or json.loads(state.read_text())["current"] is None


def _future_dated_device(tmp_path):
    """A device whose certificate starts 30 days from now (issued by a server whose clock ran fast)."""
    pki = TestPki()
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before = now + 30 * DAY
    cert = pki.device(not_before=not_before, not_after=now + 400 * DAY)
    return write_device_tree(tmp_path / "dev", pki, identity=cert, gateway_url="https://127.0.0.1:1",
                             est_url="https://127.0.0.1:1/.well-known/est"), not_before


@pytest.mark.bad_input("clock that cannot be right")
@pytest.mark.parametrize("command", ["check", "rotate"])
def test_nothing_is_judged_or_started_at_1970(tmp_path, capsys, command):
    device = due_device(tmp_path)  # due on a right clock; at 1970 it would look "not valid yet"
    code = cli.main(["--root", str(device.root), command], clock=lambda: 0.0, sleep=no_sleep)
    err = capsys.readouterr().err
    assert code == cli.EXIT_WRONG_CLOCK, err
    assert "the clock reads 1970-01-01T00:00:00Z, before this agent's release" in err
    assert "what to do: wait until the clock is set" in err
    assert "EST" not in err and "due for renewal" not in err
    assert not (device.state_dir / "state.json").exists()


@pytest.mark.bad_input("clock that cannot be right")
def test_nothing_is_judged_before_the_certificates_not_before(tmp_path, capsys):
    device, not_before = _future_dated_device(tmp_path)
    a_day_before = (not_before - DAY).timestamp()
    code = cli.main(["--root", str(device.root), "check"], clock=lambda: a_day_before, sleep=no_sleep)
    err = capsys.readouterr().err
    assert code == cli.EXIT_WRONG_CLOCK, err
    assert "before the current certificate's notBefore" in err
    assert not (device.state_dir / "state.json").exists()


@pytest.mark.bad_input("clock that cannot be right")
def test_status_on_a_wrong_clock_says_so_instead_of_counting_days(device, capsys):
    assert cli.main(["--root", str(device.root), "status"], clock=lambda: 0.0) == 0
    text = capsys.readouterr().out
    assert "(days left unknown)" in text and "clock: the clock reads 1970-01-01T00:00:00Z" in text
    assert cli.main(["--root", str(device.root), "status", "--json"], clock=lambda: 0.0) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["certificate"]["days_left"] is None and "before this agent's release" in data["clock_problem"]
