"""The real agent CLI on a device tree the filesystem makes awkward: symlinked and
hard-linked identity files, umask 000, a full disk. Each rotation runs against the
real backend on loopback and must complete (or fail clearly and resume), leaving
files outside the device's own storage untouched."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from agentdevice import active_identity, assert_rotated, fake_systemctl, new_device, run_agent

pytestmark = pytest.mark.timeout(240)


def snapshot(path: Path) -> tuple[bytes, int, int, int]:
    """What must not change about a file: content, mode, mtime, inode."""
    info = os.lstat(path)
    return path.read_bytes(), info.st_mode, info.st_mtime_ns, info.st_ino


def move_behind_symlink(link: Path, target: Path) -> None:
    """Move ``link``'s file to ``target``; ``link`` becomes a symlink to it (relative
    when the target is in the same tree, as a provisioning script would make it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(link, target)
    inside = target.is_relative_to(link.parent)
    link.symlink_to(os.path.relpath(target, link.parent) if inside else target)


@pytest.mark.bad_input("symlinked old identity")
@pytest.mark.parametrize("key_target, cert_target", [("inside", "outside"), ("outside", "inside")])
def test_symlinked_old_key_and_certificate_are_retired_without_touching_outside_files(
        backend, tmp_path, key_target, cert_target):
    device, old = new_device(backend, tmp_path, f"dev-link-{key_target}-key")
    sota = device / "var/sota"
    targets = {
        "inside": {"key": sota / "factory/pkey-factory.pem", "cert": sota / "factory/client-factory.pem"},
        "outside": {"key": tmp_path / "etc-ssl/private/device.key", "cert": tmp_path / "etc-ssl/certs/device.pem"},
    }
    key_file = targets[key_target]["key"]
    cert_file = targets[cert_target]["cert"]
    move_behind_symlink(sota / "pkey.pem", key_file)
    move_behind_symlink(sota / "client.pem", cert_file)
    outside = key_file if key_target == "outside" else cert_file
    inside = cert_file if key_target == "outside" else key_file
    outside_before = snapshot(outside)
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)

    result = run_agent(device, "rotate", "--rotation-id", "certs-linked", bin_dir=bin_dir)
    assert result.returncode == 0, result.stderr
    assert_rotated(backend, device, old, device_values={}, local_values=None)
    # The links are gone; the old file in /var/sota went with its link; the one outside is untouched.
    assert not os.path.lexists(sota / "pkey.pem") and not os.path.lexists(sota / "client.pem")
    assert not inside.exists()
    assert snapshot(outside) == outside_before
    # A later request is not stuck behind this one.
    later = run_agent(device, "rotate", "--rotation-id", "certs-after-link", bin_dir=bin_dir)
    assert later.returncode == 0, later.stderr
    assert active_identity(device)[1].name == "client-certs-after-link.pem"
    assert snapshot(outside) == outside_before


def hard_linked_device(backend, tmp_path: Path, name: str, file_name: str):
    """A registered device whose var/sota/`file_name` has a second name outside the tree."""
    device, old = new_device(backend, tmp_path, name)
    linked = device / "var/sota" / file_name
    copy = tmp_path / "someone-keeps" / file_name
    copy.parent.mkdir()
    os.link(linked, copy)
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)
    return device, old, linked, copy, bin_dir


@pytest.mark.bad_input("hard-linked old key")
def test_hard_linked_old_key_is_refused_before_anything_changes(backend, tmp_path):
    device, old, key_file, copy, bin_dir = hard_linked_device(backend, tmp_path, "dev-hardlinked-key", "pkey.pem")

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


@pytest.mark.bad_input("hard-linked old identity")
def test_hard_linked_old_certificate_is_retired_and_the_other_name_kept(backend, tmp_path):
    """A certificate is public: a second name for it must not stop the retire step."""
    device, old, cert_file, copy, bin_dir = hard_linked_device(backend, tmp_path, "dev-hardlinked-cert", "client.pem")
    kept = copy.read_bytes()
    run = run_agent(device, "rotate", "--rotation-id", "certs-linked-cert", bin_dir=bin_dir)
    assert run.returncode == 0, run.stderr
    assert_rotated(backend, device, old, device_values={}, local_values=None)
    assert not cert_file.exists() and copy.read_bytes() == kept


@pytest.mark.bad_input("umask 000")
def test_directories_the_agent_creates_are_0700_under_umask_000(backend, tmp_path):
    device, old = new_device(backend, tmp_path, "dev-umask")
    toml = device / "etc/certrotate/certrotate.toml"
    toml.write_text(toml.read_text() + '\n[storage]\nstate_dir = "/var/lib/certrotate/state"\n')
    assert not (device / "var/lib").exists()
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)

    result = run_agent(device, "rotate", "--rotation-id", "certs-umask", bin_dir=bin_dir, umask=0)
    assert result.returncode == 0, result.stderr
    state_dir = device / "var/lib/certrotate/state"
    created = [device / "var/lib", device / "var/lib/certrotate", state_dir, state_dir / "events"]
    assert {str(d.relative_to(device)): oct(d.stat().st_mode & 0o777) for d in created} == {
        str(d.relative_to(device)): "0o700" for d in created}
    key_file, cert_file = active_identity(device)
    files = {key_file: 0o600, cert_file: 0o644, state_dir / "state.json": 0o600, state_dir / "lock": 0o600}
    assert {str(f): oct(f.stat().st_mode & 0o777) for f in files} == {str(f): oct(m) for f, m in files.items()}


@contextlib.contextmanager
def small_tmpfs(directory: Path, size: str):
    """A tmpfs of ``size`` mounted on ``directory``: a filesystem that really fills up."""
    if os.geteuid() != 0:
        pytest.skip("a full filesystem is made with a tmpfs mount, which needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)],
                             capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True, timeout=30)


def fill(directory: Path, leave_blocks: int) -> Path:
    """Fill ``directory``'s filesystem with one file, then free exactly ``leave_blocks`` blocks."""
    filler = directory / "filler"
    block = os.statvfs(directory).f_bsize
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        written = 0
        while True:
            try:
                written += os.write(fd, bytes(block))
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
                break
        os.ftruncate(fd, written - leave_blocks * block)
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == leave_blocks
    return filler


@pytest.mark.bad_input("disk full")
def test_disk_full_inside_a_step_names_the_file_and_the_rotation_resumes(backend, tmp_path):
    device, old = new_device(backend, tmp_path, "dev-disk-full")
    state_dir = device / "var/sota/certrotate"
    state_dir.mkdir(mode=0o700)
    before = {p: snapshot(p) for p in (device / "var/sota").iterdir() if p.is_file()}
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)

    with small_tmpfs(state_dir, "256k"):
        # Every small file takes one block. Three free blocks: the journal (1), the
        # started event (1), the journal's rewrite (1 while both copies exist) and the
        # new key (1) fit; the issued certificate does not, and then neither does the
        # failure handler's own journal save or its events.
        filler = fill(state_dir, leave_blocks=3)
        full = run_agent(device, "rotate", "--rotation-id", "certs-disk-full", bin_dir=bin_dir)
        assert full.returncode == 1, full.stderr
        assert "step 'Generate new certificate' failed" in full.stderr, full.stderr
        assert f"No space left on device: '{state_dir / 'certs-disk-full.crt'}'" in full.stderr, full.stderr
        assert "what to do: free space" in full.stderr, full.stderr
        assert "the failure could not be recorded" in full.stderr, full.stderr  # the handler hit it too
        assert "PRIVATE KEY" not in full.stderr
        # The old identity is whole and in use; the journal loads and names the step to resume.
        assert {p: snapshot(p) for p in before} == before
        assert active_identity(device) == (device / "var/sota/pkey.pem", device / "var/sota/client.pem")
        assert backend.gateway(device, "GET", "/device").status_code == 200
        journal = json.loads((state_dir / "state.json").read_text())
        assert (journal["current"]["rotation_id"], journal["current"]["step"]) == ("certs-disk-full", 1)
        assert not list(state_dir.glob("*.certrotate-tmp"))

        filler.unlink()
        resumed = run_agent(device, "rotate", bin_dir=bin_dir)
        assert resumed.returncode == 0, resumed.stderr
        assert "resuming at step 1" in resumed.stderr
        assert_rotated(backend, device, old, device_values={}, local_values=None)
