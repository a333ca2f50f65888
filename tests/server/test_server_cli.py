"""Operator CLI: devices list/show, rotate-certs (fioctl's file), deny-list, events --follow."""

import json
import re
import subprocess
import time

import pytest

from backend import server_command
from children import spawn
from srvhelpers import certs_from_est, new_key, pubkey_pem, reenroll, write_cert, write_key

pytestmark = pytest.mark.timeout(120)
ROTATE_FILE = re.compile(
    r"ESTSERVER=(?P<est>\S+)\nPKEYIDS=01,07\nCERTIDS=03,09\nROTATIONID=certs-(?P<unix>\d+)\n\Z")


def test_devices_list_and_show(backend, tmp_path):
    backend.register("dev-a", tmp_path / "a", "--group", "lab")
    backend.register("dev-b", tmp_path / "b")
    lines = backend.cli("devices", "list").stdout.splitlines()
    assert lines[0].split() == ["NAME", "GROUP", "CREATED", "KEY", "CHANGED", "CONFIG", "LOCKED"]
    assert [line.split()[0] for line in lines[2:]] == ["dev-a", "dev-b"]
    shown = json.loads(backend.cli("devices", "show", "dev-a").stdout)
    assert shown["name"] == "dev-a" and shown["group"] == "lab"
    assert [c["issued-by"] for c in shown["certificates"]] == ["register"]
    assert "PRIVATE" not in backend.cli("devices", "show", "dev-a").stdout
    missing = backend.cli("devices", "show", "nope", check=False)
    assert missing.returncode == 1 and "unknown device" in missing.stderr


def test_device_rotate_certs_stores_fioctl_file(backend, tmp_path):
    device = backend.register("dev-1", tmp_path / "d")
    before = int(time.time())
    backend.cli("devices", "config", "rotate-certs", "dev-1", "--reason", "yearly")
    entry = backend.gateway(device, "GET", "/config").json()["fio-rotate-certs"]
    assert entry["Unencrypted"] is True
    assert entry["OnChanged"] == ["/usr/share/fioconfig/handlers/renew-client-cert"]
    match = ROTATE_FILE.match(entry["Value"])
    assert match and match["est"] == backend.est_url and before <= int(match["unix"]) <= time.time()

    backend.cli("devices", "config", "rotate-certs", "dev-1", "--reason", "x", "--est-server", "https://est.example:8443/.well-known/est")
    entry = backend.gateway(device, "GET", "/config-device").json()["fio-rotate-certs"]
    assert ROTATE_FILE.match(entry["Value"])["est"] == "https://est.example:8443/.well-known/est"


def test_group_rotate_certs(backend, tmp_path):
    in_group = backend.register("g-1", tmp_path / "g1", "--group", "fleet")
    outside = backend.register("o-1", tmp_path / "o1")
    backend.cli("config", "rotate-certs", "--group", "fleet", "--reason", "compromise drill")
    assert ROTATE_FILE.match(backend.gateway(in_group, "GET", "/config").json()["fio-rotate-certs"]["Value"])
    assert "fio-rotate-certs" not in backend.gateway(outside, "GET", "/config").json()
    # Group files are not device files: /config-device stays empty.
    assert backend.gateway(in_group, "GET", "/config-device").status_code == 204


def test_rotate_certs_without_est_url(tmp_path):
    from backend import Backend

    offline = Backend(tmp_path / "f")
    offline.register("d", tmp_path / "d", "--gateway-url", "https://g:1", "--est-url", "https://e:2/.well-known/est")
    result = offline.cli("devices", "config", "rotate-certs", "d", "--reason", "r", check=False)
    assert result.returncode == 2 and "--est-server" in result.stderr


def test_config_set_usage_errors(backend, tmp_path):
    backend.register("d", tmp_path / "d")
    bad = backend.cli("devices", "config", "set", "d", "no-equals-sign", check=False)
    assert bad.returncode == 2 and "FILE=VALUE" in bad.stderr
    unknown = backend.cli("devices", "config", "set", "ghost", "a=b", check=False)
    assert unknown.returncode == 1 and "unknown device" in unknown.stderr


def test_events_follow_and_deny_list(backend, tmp_path):
    device = backend.register("dev-1", tmp_path / "d")
    assert backend.cli("deny-list").stdout.splitlines()[0].split() == ["DEVICE", "SERIAL", "DENIED", "AT", "REASON",
                                                                       "SHA256"]
    follower = spawn([*server_command(), "events", "--follow", "--dir", str(backend.dir)],
                     stdout=subprocess.PIPE, text=True)
    try:
        key = new_key()
        [cert] = certs_from_est(reenroll(backend, device, key).content)
        backend.gateway(device, "PATCH", "/device", json={"next_pubkey": pubkey_pem(key)})
        backend.gateway(device, "GET", "/device", key=write_key(tmp_path / "k", key), cert=write_cert(tmp_path / "c", cert))
        event = json.loads(follower.stdout.readline())
        assert event["type"] == "DEVICE_PUBKEY_CHANGE" and event["device"] == "dev-1" and event["seq"] == 1
    finally:
        follower.terminate()
        follower.wait(10)
    assert len(backend.cli("deny-list").stdout.splitlines()) == 3
