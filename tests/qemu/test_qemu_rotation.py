"""A device booted from the test image rotates its identity for real under systemd.

One guest serves the whole module (a boot costs about half a minute under
emulation); the tests run in file order: first the idle checks, then an
operator's rotation, then one made due by the renewal policy.
"""

from __future__ import annotations

import shlex

import pytest

import qemu_image as image
from qemu_checks import RENEWAL_DUE_AT_ONCE, assert_rotated, operator_rotation, seed_device_config
from qemu_guest import TEST_DIR
from qemu_timing import stage

pytestmark = pytest.mark.timeout(900)

CERTROTATE_TOML = "/etc/certrotate/certrotate.toml"
# Not under /root: a Yocto image's root home is /home/root.
CERTROTATE_TOML_SAVED = f"{TEST_DIR}/certrotate.toml.orig"
HANDLER = "/usr/share/fioconfig/handlers/renew-client-cert"


@pytest.fixture(scope="module")
def device(make_guest, module_backend):
    guest = make_guest("dev-main", module_backend,
                       lambda tree: seed_device_config(module_backend, "dev-main", tree))
    guest.boot("first boot")
    yield guest
    guest.shutdown()
    result = image.fsck(guest.vm.disk)
    assert result.returncode == 0, f"root filesystem not clean after shutdown:\n{result.stdout}{result.stderr}"


def test_units_installed_and_enabled(device):
    host = device.vm.testinfra_host()
    assert host.file("/usr/bin/certrotate").mode == 0o755
    assert host.file(HANDLER).mode == 0o755
    assert host.file(CERTROTATE_TOML).exists
    assert host.service("certrotate.timer").is_enabled
    assert host.service("certrotate.timer").is_running
    assert host.run("systemctl is-enabled certrotate.service").stdout.strip() == "static"
    next_run = host.run("systemctl show certrotate.timer -P NextElapseUSecRealtime").stdout.strip()
    assert next_run and next_run != "n/a", f"certrotate.timer not scheduled: {next_run!r}"
    for standin in ("aktualizr-lite.service", "fioconfig.service"):
        assert host.service(standin).is_enabled and host.service(standin).is_running
    device.wait_standin_ok("/var/sota/client.pem")
    # From here the tests start the agent themselves; a timer run in between
    # (its first one comes minutes after boot) would be a second rotation.
    device.ssh("systemctl stop certrotate.timer")


def test_takeover_sets_a_fioconfig_rotation_aside_under_systemd(device):
    """A rotation fioconfig began before the takeover is not resumed: the drop-in
    renames its state file before fioconfig's unit starts; the identity stays."""
    state = "/var/sota/cert-rotation.state"
    assert device.ssh("systemctl show fioconfig.service -P DropInPaths").stdout.strip().endswith(
        "/fioconfig.service.d/certrotate.conf")
    device.ssh(f"echo '{{}}' > {state} && systemctl restart fioconfig.service")
    listing = device.ssh("ls /var/sota").stdout.split()
    assert "cert-rotation.state" not in listing and "cert-rotation.state.set-aside-by-certrotate" in listing
    device.ssh(f"rm {state}.set-aside-by-certrotate && systemctl restart fioconfig.service")
    assert device.ssh("systemctl is-active fioconfig.service").stdout.strip() == "active"
    device.wait_standin_ok("/var/sota/client.pem")


def test_check_does_nothing_when_not_due(device):
    before = device.ssh("sha256sum /var/sota/sota.toml /var/sota/pkey.pem /var/sota/client.pem").stdout
    result = device.run_certrotate_service()
    assert result.returncode == 0, device.journal()
    assert device.ssh("systemctl show certrotate.service -P Result").stdout.strip() == "success"
    assert device.ssh("sha256sum /var/sota/sota.toml /var/sota/pkey.pem /var/sota/client.pem").stdout == before
    status = device.status()
    assert status["rotation"] is None and status["last_completed"] is None, status
    updates = device.backend.cli("devices", "updates", device.name).stdout
    assert "certs-" not in updates, updates


def test_a_wrong_clock_is_waited_out_under_systemd(device):
    """A device whose clock reads 1970 (no RTC, NTP not answered yet): the unit runs after
    time-sync.target, and the agent judges nothing on such a clock: exit 5, which the unit
    counts as success (the timer retries), nothing changed; once the clock is set, it acts."""
    assert "time-sync.target" in device.ssh("systemctl show certrotate.service -P After").stdout.split()
    files = "/var/sota/sota.toml /var/sota/pkey.pem /var/sota/client.pem /var/sota/root.crt"
    before = device.ssh(f"sha256sum {files}").stdout
    right_now = int(device.guest_time())
    device.ssh("timedatectl set-ntp false >/dev/null 2>&1 || true; date -s @86400 >/dev/null")
    try:
        result = device.run_certrotate_service()
        assert result.returncode == 0, device.journal()
        assert device.ssh("systemctl show certrotate.service -P ExecMainStatus").stdout.strip() == "5"
        assert "the clock reads 1970-01-02" in device.journal(), device.journal()
    finally:
        device.ssh(f"date -s @{right_now + 5} >/dev/null")
    assert device.ssh(f"sha256sum {files}").stdout == before
    result = device.run_certrotate_service()
    assert result.returncode == 0, device.journal()
    assert device.ssh("systemctl show certrotate.service -P ExecMainStatus").stdout.strip() == "0"


def test_operator_rotation(device, scratch):
    rotation_id, new = operator_rotation(device, scratch)

    # fioconfig delivers the same file again on its next poll: nothing happens.
    again = device.deliver_config()
    assert again.returncode == 0, f"{again.stdout}{again.stderr}"
    assert f"rotation {rotation_id} already completed" in again.stderr
    assert "handed to" not in again.stderr
    assert device.identity_paths() == (new.key_path, new.cert_path)


def test_rotation_due_by_policy(device, scratch):
    old = device.identity(scratch / "old")
    config = device.vm.read(CERTROTATE_TOML)
    assert "[renewal]" not in config, config
    device.ssh(f"cp {CERTROTATE_TOML} {CERTROTATE_TOML_SAVED} && "
               f"printf %s {shlex.quote(RENEWAL_DUE_AT_ONCE)} >> {CERTROTATE_TOML}")
    try:
        since = device.guest_time()
        with stage(f"{device.name}: rotation due by policy (certrotate.service)"):
            result = device.run_certrotate_service()
        assert result.returncode == 0, device.journal()
        rotation_id = device.status()["last_completed"]["rotation_id"]
        new = assert_rotated(device, rotation_id, old, scratch / "new")
        device.wait_standin_ok(new.cert_path, since=since)
    finally:
        device.ssh(f"mv {CERTROTATE_TOML_SAVED} {CERTROTATE_TOML}")
    # With the policy back to its default the new certificate is not due.
    assert device.run_certrotate_service().returncode == 0
    assert device.identity_paths() == (new.key_path, new.cert_path)


def test_ptest_passes_on_the_guest(device):
    with stage(f"{device.name}: ptest"):
        result = device.ssh("/usr/lib/certrotate/ptest/run-ptest", check=False, timeout=600)
    summary = [line for line in result.stdout.splitlines() if line.split(":", 1)[0] in ("PASS", "FAIL", "SKIP")]
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert summary and not any(line.startswith("FAIL:") for line in summary), "\n".join(summary)
    assert any(line.startswith("PASS:") for line in summary)
