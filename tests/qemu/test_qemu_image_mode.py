"""Image mode, proven on an image we have: the Debian-built disk handed over
as a plain image file, no device in it, logged in as LmP's user would be.

The disk is built from the same base tree as the other tests (agent, units,
stand-ins) but with no identity and no ssh key authorized. The suite's image mode
then does what it does with an LmP .wic: a qcow2 overlay, password login as
fio with sudo, key installed, device provisioned over ssh; one operator
rotation completes; a power cut and a boot of the same overlay keep the new
identity; the image file itself is never written.
"""

from __future__ import annotations

import json
import subprocess

import pytest

import qemu_image as image
from qemu_checks import operator_rotation, seed_device_config
from qemu_timing import stage
from qemu_vm import Login

pytestmark = pytest.mark.timeout(600)

NAME = "dev-image"
LMP_LOGIN = Login("fio", "fio", sudo=True)


def test_image_mode_on_a_plain_debian_disk(image_mode, request, qemu_workdir):
    if image_mode is not None:
        pytest.skip(f"image mode: the suite already runs against {image_mode.path}; this test proves "
                    "image mode on the Debian-built disk in the default mode")
    base_tree, make_guest, module_backend, scratch = (
        request.getfixturevalue(name) for name in ("base_tree", "make_guest", "module_backend", "scratch"))
    plain = qemu_workdir / "plain-image" / "debian.wic"
    plain.parent.mkdir()
    with stage("plain image for image mode"):
        image.plain_disk(base_tree, plain)
    untouched = (plain.stat().st_size, plain.stat().st_mtime_ns, plain.stat().st_ctime_ns)

    guest = make_guest(NAME, module_backend, lambda tree: seed_device_config(module_backend, NAME, tree),
                       from_image=image.ImageMode(plain, LMP_LOGIN))
    overlay = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(guest.vm.disk)],
                                        capture_output=True, text=True, check=True).stdout)
    assert overlay["format"] == "qcow2" and overlay["backing-filename"] == str(plain), overlay

    guest.boot("first boot: password login, provisioning over ssh")
    # The suite works as fio, reaching root through sudo.
    assert guest.ssh('echo "$(id -u) $SUDO_USER"').stdout.split() == ["0", "fio"]
    guest.wait_standin_ok("/var/sota/client.pem")
    assert guest.status()["rotation"] is None

    rotation_id, new = operator_rotation(guest, scratch)

    guest.power_cut()
    guest.boot("after a power cut: the overlay keeps the state")
    assert guest.identity_paths() == (new.key_path, new.cert_path)
    guest.wait_standin_ok(new.cert_path)
    assert guest.status()["last_completed"]["rotation_id"] == rotation_id

    guest.shutdown()
    check = image.fsck(guest.vm.disk)
    assert check.returncode == 0, f"root filesystem not clean:\n{check.stdout}{check.stderr}"
    assert (plain.stat().st_size, plain.stat().st_mtime_ns, plain.stat().st_ctime_ns) == untouched, \
        f"image mode wrote to the image {plain}"
