"""Fixtures for the QEMU end-to-end suite and its timing summary.

The session builds (or takes from the cache) the root filesystem, lays the
layer's payload and the stand-ins on it once, and each device gets its own
disk from that base plus its provisioned identity. Every stage's duration is
recorded and printed at the end of the run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
for path in (HERE, TESTS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import qemu_image as image  # noqa: E402
import recipe_install  # noqa: E402
from backend import Backend  # noqa: E402
import qemu_timing as timing  # noqa: E402
from qemu_guest import TEST_DIR, Guest, guest_urls  # noqa: E402
from qemu_timing import record_stage, stage  # noqa: E402
from qemu_vm import OVMF_CODE, OVMF_VARS, VM  # noqa: E402

# The image has no fioconfig, so the layer's handler takes the name that
# fioctl's rotate-certs config asks for (meta-certrotate/README.md).
PAYLOAD_OVERRIDES = {"CERTROTATE_FIOCONFIG_HANDLER": "renew-client-cert"}

REQUIRED_COMMANDS = ("qemu-system-x86_64", "mmdebstrap", "zstd", "mkfs.ext4", "e2fsck", "debugfs",
                     "mkfs.vfat", "mcopy", "sfdisk", "ssh", "ssh-keygen", "chroot")


def pytest_runtest_logreport(report):
    if report.when == "call" and os.path.basename(report.nodeid.split("::")[0]).startswith("test_qemu_"):
        record_stage(f"test {report.nodeid.rsplit('::', 1)[-1]} ({report.outcome})", report.duration)


def pytest_terminal_summary(terminalreporter):
    if not timing.stages:
        return
    terminalreporter.section("QEMU stage timings")
    for name, seconds in timing.stages:
        terminalreporter.write_line(f"{seconds:8.1f} s  {name}")
    terminalreporter.write_line(f"{time.monotonic() - timing.started:8.1f} s  QEMU suite wall time "
                                "(first QEMU fixture to this summary; stages above overlap)")


def _missing_prerequisites() -> list[str]:
    missing = [f"command {c}" for c in REQUIRED_COMMANDS if shutil.which(c) is None]
    missing += [f"file {f}" for f in (OVMF_CODE, OVMF_VARS) if not f.exists()]
    if os.geteuid() != 0:
        missing.append("root (mmdebstrap --mode=root, chroot, file ownership in the image)")
    return missing


@pytest.fixture(scope="session")
def qemu_prerequisites():
    missing = _missing_prerequisites()
    if missing:
        pytest.skip("QEMU suite needs " + ", ".join(missing) + " (ci/setup test installs them; run as root)")


@pytest.fixture(scope="session")
def qemu_workdir(qemu_prerequisites, request):
    """The session's disks, VMs and backends. Not under pytest's basetemp:
    concurrent pytest runs prune /tmp/pytest-of-USER while VMs still use it.
    Removed after a run without failures, kept (and named) otherwise."""
    timing.started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="certrotate-qemu-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    failures = request.session.testsfailed
    yield workdir
    if request.session.testsfailed == failures:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"\nQEMU work files kept in {workdir}")


@pytest.fixture
def scratch(qemu_workdir, request) -> Path:
    """A per-test directory inside the session's work directory."""
    return Path(tempfile.mkdtemp(prefix=request.node.name[:40] + "-", dir=qemu_workdir))


@pytest.fixture(scope="session")
def ssh_key(qemu_workdir) -> Path:
    key = qemu_workdir / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "certrotate-qemu-test",
                    "-f", str(key)], check=True)
    return key


@pytest.fixture(scope="session")
def install_layer_payload():
    """``install(destdir, **options)``: the layer's payload (tests/recipe_install.py,
    the recipe's own install step) as this image configures it."""
    return lambda destdir, **options: recipe_install.install_payload(destdir, overrides=PAYLOAD_OVERRIDES, **options)


@pytest.fixture(scope="session")
def base_tree(qemu_workdir, ssh_key, install_layer_payload) -> Path:
    """The unpacked root filesystem with the layer's payload, stand-ins and ssh key."""
    started = time.monotonic()
    tarball, built = image.rootfs_tarball()
    record_stage(f"root filesystem {'built' if built else 'taken from cache'} ({tarball.name})",
                 time.monotonic() - started)
    with stage("base tree: unpack, layer payload, stand-ins"):
        base = image.prepare_base_tree(
            tarball, qemu_workdir / "base", ssh_key.with_suffix(".pub").read_text(),
            install_layer_payload)
        (base / TEST_DIR.lstrip("/")).mkdir(parents=True)
        return base


@pytest.fixture(scope="module")
def make_guest(base_tree, ssh_key, qemu_workdir):
    """Factory: register a device with ``backend`` for the guest's view of the
    host (10.0.2.2) and build its disk. Booting is the caller's; guests still
    running when the module ends are powered off."""
    guests: list[Guest] = []

    def make(name: str, backend, prepare_device=None) -> Guest:
        """``prepare_device(device_tree)`` may add files before the disk is built."""
        workdir = qemu_workdir / name
        workdir.mkdir()
        device_tree = backend.register(name, workdir / "device", *guest_urls(backend))
        if prepare_device:
            prepare_device(device_tree)
        with stage(f"{name}: disk image"):
            disk = image.device_disk(base_tree, device_tree, workdir / "disk.raw")
        guest = Guest(name, VM(disk, workdir / "vm", ssh_key), backend)
        guests.append(guest)
        return guest

    yield make
    for guest in guests:
        guest.vm.power_cut()


@pytest.fixture(scope="module")
def module_backend(qemu_workdir, request):
    """A backend shared by one test module's guest (booting is too slow to do per test)."""
    server = Backend(Path(tempfile.mkdtemp(prefix=request.module.__name__ + "-", dir=qemu_workdir)) / "factory")
    server.start()
    yield server
    server.stop()
