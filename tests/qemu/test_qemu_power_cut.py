"""Power cuts during a rotation under systemd, in QEMU: the rotation converges.

One guest, one rotation, cut at a chosen moment inside every step: the agent
pauses at a named crash point (CERTROTATE_PAUSE_AT in a certrotate.service
drop-in), the test sees the notify file over ssh and SIGKILLs QEMU, then boots
the same disk again and lets the next `systemctl start certrotate.service`
(what certrotate.timer does) carry on to the next cut. After one of the cuts
the agent is replaced offline by a newer version, as an OTA update between
the power loss and the next boot would; the rotation finishes with it (not in
image mode: there the test runs without that replacement and the OTA case is
reported as skipped).
At every boot the device is online with the identity sota.toml names; at the
end the rotation is complete, the filesystem clean, no key lost.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import qemu_image as image
from history import older_agent_package
from qemu_checks import RENEWAL_DUE_AT_ONCE, assert_online, assert_rotated, gateway_accepts, seed_device_config
from qemu_guest import TEST_DIR
from qemu_timing import stage

pytestmark = pytest.mark.timeout(1800)

NAME = "dev-cuts"
TRACE = f"{TEST_DIR}/trace"
SITELIB = "/usr/lib/python3/dist-packages"
# Step keys of agent/certrotate/rotation.py's STEPS, in order (steps 1-8 of
# docs/contracts.md); step 0 and the completion are cut at fixed points.
STEP_KEYS = ["est", "lock", "local_config", "server_config", "finalize", "restart", "confirm", "retire"]
OTA_AFTER_STEP = "finalize"
OTA_SKIP_IN_IMAGE_MODE = (
    "image mode: the OTA case replaces the agent in the stopped disk's ext4 root with debugfs; on a "
    "real LmP image an OTA update is an ostree deployment, which this suite does not build, so only "
    "the power cuts run against the image")


def pytest_generate_tests(metafunc):
    """``ota_update``: whether the agent is replaced between a cut and the next
    boot. Image mode runs the cuts without it and reports the OTA case skipped."""
    if "ota_update" not in metafunc.fixturenames:
        return
    if image.image_mode_from(metafunc.config.getoption("--image", default=None)) is None:
        metafunc.parametrize("ota_update", [pytest.param(True, id="with-ota-update")])
    else:
        metafunc.parametrize("ota_update", [
            pytest.param(True, id="with-ota-update", marks=pytest.mark.skip(reason=OTA_SKIP_IN_IMAGE_MODE)),
            pytest.param(False, id="without-ota-update")])


def due_at_once(device_tree: Path) -> None:
    toml = device_tree / "etc/certrotate/certrotate.toml"
    assert "[renewal]" not in toml.read_text()
    with toml.open("a") as file:
        file.write(RENEWAL_DUE_AT_ONCE)


def cut_points(trace: list[str]) -> list[tuple[str, str]]:
    """(step, point) to cut at: one point inside each step, taken from a clean
    rotation's trace, each reached exactly once in a rotation."""
    chosen = [("started", "journal:start")]
    for key in STEP_KEYS:
        own = [p for p in trace if p.startswith(key + ":") and trace.count(p) == 1]
        # The middle of the step's own points: some of its work durable, some not.
        chosen.append((key, own[len(own) // 2] if own else f"event:{key}"))
    chosen.append(("completion", "event:completed"))
    for step, point in chosen:
        assert trace.count(point) == 1, f"cut point {point} (step {step}) reached {trace.count(point)} times: {trace}"
    return chosen


def newer_agent(install_layer_payload, workdir: Path) -> tuple[str, dict[str, Path]]:
    """The layer's payload with the agent's version bumped: (version, guest dir -> host tree)."""
    payload = workdir / "ota-payload"
    install_layer_payload(payload, ptest=False)
    site = payload / SITELIB.lstrip("/")
    init = site / "certrotate/__init__.py"
    old_version = re.search(r'__version__ = "([^"]+)"', init.read_text()).group(1)
    major, minor, patch = (int(part) for part in old_version.split(".")[:3])
    version = f"{major}.{minor}.{patch + 1}"
    init.write_text(init.read_text().replace(f'__version__ = "{old_version}"', f'__version__ = "{version}"'))
    old_info = site / f"certrotate-{old_version}.dist-info"
    metadata = old_info / "METADATA"
    metadata.write_text(metadata.read_text().replace(f"Version: {old_version}\n", f"Version: {version}\n", 1))
    new_info = old_info.rename(site / f"certrotate-{version}.dist-info")
    return version, {f"{SITELIB}/certrotate": site / "certrotate",
                     f"{SITELIB}/{new_info.name}": new_info}


def agent_version(guest) -> str:
    return guest.ssh("python3 -c 'import certrotate, importlib.metadata as m; "
                     "print(certrotate.__version__, m.version(\"certrotate\"))'").stdout.strip()


def test_power_cut_in_every_step_converges(make_guest, module_backend, install_layer_payload, scratch, ota_update):
    guest = make_guest(NAME, module_backend, lambda tree: (seed_device_config(module_backend, NAME, tree),
                                                           due_at_once(tree)))
    guest.boot("first boot")
    guest.ssh("systemctl stop certrotate.timer")  # the test starts the agent itself

    # A clean rotation, traced: it names the points to cut at.
    guest.set_agent_environment(CERTROTATE_TRACE_POINTS=TRACE)
    with stage(f"{NAME}: traced rotation"):
        result = guest.run_certrotate_service()
    assert result.returncode == 0, guest.journal()
    points = cut_points(guest.vm.read(TRACE).split())
    first_id = guest.status()["last_completed"]["rotation_id"]

    old = guest.identity(scratch / "old")
    original_version = agent_version(guest)
    if ota_update:
        version, ota_trees = newer_agent(install_layer_payload, scratch)
        old_trees = [f"{SITELIB}/certrotate", *guest.ssh(f"ls -d {SITELIB}/certrotate-*.dist-info").stdout.split()]
    rotation_id = None
    for step, point in points:
        guest.pause_agent_at(point, timeout=300)
        rotation_id = rotation_id or guest.status()["rotation"]["id"]
        assert rotation_id != first_id
        guest.power_cut()
        if ota_update and step == OTA_AFTER_STEP:
            image.replace_offline(guest.vm.disk, remove=old_trees,
                                  add=ota_trees, workdir=scratch / "ota-disk")
        guest.boot(f"after a cut at {point}")
        guest.ssh("systemctl stop certrotate.timer")
        status = guest.status()
        assert status["rotation"] and status["rotation"]["id"] == rotation_id, status
        assert_online(guest)

    guest.set_agent_environment()
    with stage(f"{NAME}: rotation converges"):
        result = guest.run_certrotate_service()
    assert result.returncode == 0, guest.journal()
    if ota_update:
        assert agent_version(guest) == f"{version} {version}" != original_version
    else:
        assert agent_version(guest) == original_version
    new = assert_rotated(guest, rotation_id, old, scratch / "new", repeats_allowed=True)
    guest.wait_standin_ok(new.cert_path)
    assert gateway_accepts(module_backend, new.key, new.cert)

    guest.shutdown()
    check = image.fsck(guest.vm.disk)
    assert check.returncode == 0, f"root filesystem not clean:\n{check.stdout}{check.stderr}"


def test_ota_rollback_in_the_middle_of_a_rotation(make_guest, module_backend, install_layer_payload, scratch,
                                                  image_mode):
    """The reverse OTA: cut in the middle of a rotation, and the next boot runs an older agent
    (history.OLDER_RELEASE's, as an image rollback would bring back; /var/sota stays). It
    resumes the journal the newer agent wrote (schema 1, a file rotation) and completes it;
    the newer agent, back with the next update, takes the result as its own."""
    if image_mode is not None:
        pytest.skip(OTA_SKIP_IN_IMAGE_MODE)
    older = older_agent_package(scratch / "older")
    name = "dev-rollback"
    guest = make_guest(name, module_backend, lambda tree: (seed_device_config(module_backend, name, tree),
                                                           due_at_once(tree)))
    guest.boot("first boot")
    guest.ssh("systemctl stop certrotate.timer")
    old = guest.identity(scratch / "old")
    guest.pause_agent_at("journal:server_config")  # steps 1-4 done, sota.toml still the old identity
    rotation_id = guest.status()["rotation"]["id"]
    guest.power_cut()

    image.replace_offline(guest.vm.disk, remove=[f"{SITELIB}/certrotate"],
                          add={f"{SITELIB}/certrotate": older}, workdir=scratch / "rollback-disk")
    guest.boot("after a cut and an OTA rollback")
    guest.ssh("systemctl stop certrotate.timer")
    assert guest.ssh("python3 -c 'import certrotate.anchors'", check=False).returncode != 0, "not the older agent"
    assert_online(guest)
    guest.set_agent_environment()
    with stage(f"{name}: the older agent resumes"):
        result = guest.run_certrotate_service()
    assert result.returncode == 0, guest.journal()
    new = assert_rotated(guest, rotation_id, old, scratch / "new", repeats_allowed=True)

    guest.shutdown()
    payload = scratch / "forward-payload"
    install_layer_payload(payload, ptest=False)
    image.replace_offline(guest.vm.disk, remove=[f"{SITELIB}/certrotate"],
                          add={f"{SITELIB}/certrotate": payload / SITELIB.lstrip("/") / "certrotate"},
                          workdir=scratch / "forward-disk")
    guest.boot("after the OTA update back to the newer agent")
    guest.ssh("systemctl stop certrotate.timer")
    guest.ssh("python3 -c 'import certrotate.anchors'")
    status = guest.status()
    assert status["rotation"] is None and status["last_completed"]["rotation_id"] == rotation_id, status
    guest.wait_standin_ok(new.cert_path)
    guest.shutdown()
