"""Fixtures for the QEMU end-to-end suite and its timing summary.

The session builds (or takes from the cache) the root filesystem, lays the
layer's payload and the stand-ins on it once, and each device gets its own
disk from that base plus its provisioned identity. Every stage's duration is
recorded and printed at the end of the run.

Image mode (``pytest tests/qemu --image PATH.wic`` or CERTROTATE_QEMU_IMAGE)
boots each device from a qcow2 overlay on that image instead and provisions
it over ssh; see README.md.
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

# As the kas LmP configuration builds it: certrotate takes over fioconfig's
# renew-client-cert handler (the name fioctl's rotate-certs config asks for) and
# its units' drop-ins (meta-certrotate/README.md).
PAYLOAD_OVERRIDES = {"CERTROTATE_FIOCONFIG_TAKEOVER": "1"}

REQUIRED_COMMANDS = ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "zstd", "mkfs.ext4", "e2fsck", "debugfs",
                     "mkfs.vfat", "mcopy", "sfdisk", "ssh", "ssh-keygen", "chroot")
# Image mode builds nothing: it boots, logs in and checks the filesystem.
IMAGE_MODE_COMMANDS = ("qemu-system-x86_64", "qemu-img", "e2fsck", "sfdisk", "ssh", "ssh-keygen")


def pytest_addoption(parser):
    parser.addoption("--image", metavar="PATH.wic", default=None,
                     help="QEMU suite: boot this disk image (e.g. an LmP .wic from kas build) instead of "
                          "the Debian-built one (also CERTROTATE_QEMU_IMAGE; see tests/qemu/README.md)")


def pytest_configure(config):
    # A wrong image path or login stops the run before anything boots.
    try:
        image.image_mode_from(config.getoption("--image", default=None))
    except ValueError as error:
        raise pytest.UsageError(f"QEMU image mode: {error}") from None


def pytest_runtest_logreport(report):
    if report.when == "call" and os.path.basename(report.nodeid.split("::")[0]).startswith("test_qemu_"):
        record_stage(f"test {report.nodeid.rsplit('::', 1)[-1]} ({report.outcome})", report.duration)


def pytest_terminal_summary(terminalreporter):
    if not timing.stages:
        return
    terminalreporter.section("QEMU stage timings")
    for name, seconds in timing.stages:
        terminalreporter.write_line(f"{seconds:8.1f} s  {name}")
    if timing.started is not None:  # else no guest was set up (only harness tests ran)
        terminalreporter.write_line(f"{time.monotonic() - timing.started:8.1f} s  QEMU suite wall time "
                                    "(first QEMU fixture to this summary; stages above overlap)")


def _missing_prerequisites(in_image_mode: bool) -> list[str]:
    commands = IMAGE_MODE_COMMANDS if in_image_mode else REQUIRED_COMMANDS
    missing = [f"command {c}" for c in commands if shutil.which(c) is None]
    missing += [f"file {f}" for f in (OVMF_CODE, OVMF_VARS) if not f.exists()]
    if os.geteuid() != 0 and not in_image_mode:
        missing.append("root (mmdebstrap --mode=root, chroot, file ownership in the image)")
    return missing


@pytest.fixture(scope="session")
def image_mode(request) -> image.ImageMode | None:
    """The disk image the suite runs against in image mode, else None
    (pytest_configure has already rejected bad settings)."""
    return image.image_mode_from(request.config.getoption("--image", default=None))


@pytest.fixture(scope="session")
def qemu_prerequisites(image_mode):
    missing = _missing_prerequisites(image_mode is not None)
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
def make_guest(request, image_mode, ssh_key, qemu_workdir):
    """Factory: register a device with ``backend`` for the guest's view of the
    host (10.0.2.2) and build its disk. Booting is the caller's; guests still
    running when the module ends are powered off.

    In image mode (``from_image``, else the session's --image) the disk is a
    qcow2 overlay on the image and the first boot provisions the device over
    ssh; otherwise the device is provisioned into a disk built from the base tree."""
    guests: list[Guest] = []
    base_tree = None if image_mode else request.getfixturevalue("base_tree")

    def make(name: str, backend, prepare_device=None, from_image: image.ImageMode | None = None,
             register=None) -> Guest:
        """``prepare_device(device_tree)`` may add files before the device is provisioned;
        ``register(name, out, *args)`` registers it (default: backend.register)."""
        workdir = qemu_workdir / name
        workdir.mkdir()
        device_tree = (register or backend.register)(name, workdir / "device", *guest_urls(backend))
        if prepare_device:
            prepare_device(device_tree)
        source = from_image or image_mode
        if source:
            overlay = image.overlay_on(source.path, workdir / "disk.qcow2")
            guest = Guest(name, VM(overlay, workdir / "vm", ssh_key, source.login, disk_format="qcow2"),
                          backend, provision_tree=device_tree)
        else:
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
