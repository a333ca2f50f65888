"""The real agent CLI on a device tree the filesystem makes awkward: symlinked and
hard-linked identity files, umask 000, a full disk. Each rotation runs against the
real backend on loopback and must complete (or fail clearly and resume), leaving
files outside the device's own storage untouched."""

from __future__ import annotations

import os

import pytest

from agentdevice import active_identity, assert_rotated, fake_systemctl, new_device, run_agent

pytestmark = pytest.mark.timeout(240)


@pytest.mark.bad_input("hard-linked old key")
def test_hard_linked_old_key_is_refused_before_anything_changes(backend, tmp_path):
    device, old = new_device(backend, tmp_path, "dev-hardlinked-key")
    key_file = device / "var/sota/pkey.pem"
    copy = tmp_path / "someone-keeps/pkey.pem"
    copy.parent.mkdir()
    os.link(key_file, copy)
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)

    refused = run_agent(device, "rotate", "--rotation-id", "certs-hardlinked", bin_dir=bin_dir)
    assert refused.returncode == 1, refused.stderr
    assert "step 'Generate new certificate' failed" in refused.stderr, refused.stderr
    assert f"{key_file} has 2 hard links" in refused.stderr, refused.stderr
    assert "samefile" in refused.stderr, refused.stderr
    assert copy.read_bytes() == old.key_pem
    assert active_identity(device) == (key_file, device / "var/sota/client.pem")
    assert backend.gateway(device, "GET", "/device").status_code == 200

    copy.unlink()
    resumed = run_agent(device, "rotate", bin_dir=bin_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert_rotated(backend, device, old, device_values={}, local_values=None)