"""Issue item 16: what a test run starts (certrotate-server, QEMU) dies with the
run, however the run ends: SIGTERM to make, as a time limit sends it, or
SIGKILL to pytest itself, or a pytest-timeout expiry.

Each case runs a one-test pytest session through make, as `make test-qemu`
does. That session takes the suite's `backend` fixture and powers on a VM
through tests/qemu's launcher, with a stand-in qemu-system-x86_64 (sleep) first
on PATH, writes the pids it started and waits to be killed.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from children import spawn

pytestmark = pytest.mark.timeout(60)

TESTS = Path(__file__).resolve().parent
PIDS_TIMEOUT = 30
GONE_TIMEOUT = 5

SESSION_TEST = '''
import os
import time
from pathlib import Path

from qemu_vm import VM


def test_wait_to_be_killed(backend, tmp_path):
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    (vm_dir / "OVMF_VARS.fd").touch()  # the stand-in reads no firmware
    vm = VM(tmp_path / "disk.raw", vm_dir, tmp_path / "id_ed25519")
    vm.start()
    pids = Path(os.environ["SESSION_PIDS"])
    pids.with_suffix(".partial").write_text(f"{os.getpid()} {backend.proc.pid} {vm.process.pid} {backend.log_path}")
    pids.with_suffix(".partial").rename(pids)
    time.sleep(120)
'''

# -p conftest: the suite's tests/conftest.py (its fixtures and SIGTERM handling)
# for a test file outside tests/.
MAKEFILE = """\
session:
\t$(PYTHON) -m pytest -q -p no:cacheprovider -p conftest --basetemp=$(BASETEMP) $(SESSION_ARGS) session_test.py
"""


@pytest.fixture
def workdir():
    """Short: the VM's ssh control socket path lies under it and must fit a Unix socket address."""
    path = Path(tempfile.mkdtemp(prefix="harness-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def running(pid: int) -> bool:
    """Neither gone nor a zombie: an orphan's reaper may be slow or absent in a container."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for_pids(make: subprocess.Popen, pids: Path) -> list[str]:
    deadline = time.monotonic() + PIDS_TIMEOUT
    while not pids.exists():
        if make.poll() is not None or time.monotonic() > deadline:
            make.kill()
            pytest.fail(f"the session started nothing (make exit {make.wait()}):\n{make.stdout.read()}")
        time.sleep(0.1)
    return pids.read_text().split()


@pytest.mark.parametrize("ending", ["make-sigterm", "pytest-sigkill", "pytest-timeout"])
def test_children_die_with_the_run(workdir, ending):
    (workdir / "Makefile").write_text(MAKEFILE)
    (workdir / "session_test.py").write_text(SESSION_TEST)
    bin_dir = workdir / "bin"
    bin_dir.mkdir()
    qemu = bin_dir / "qemu-system-x86_64"
    qemu.write_text("#!/bin/sh\nexec sleep 600\n")
    qemu.chmod(0o755)
    # pytest-timeout's thread method ends the session with os._exit, no finalizers.
    session_args = "--timeout=3 --timeout-method=thread -o timeout_func_only=true" if ending == "pytest-timeout" else ""
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "PYTHONPATH": f"{TESTS}:{TESTS / 'qemu'}", "SESSION_PIDS": str(workdir / "pids")}
    make = spawn(["make", "-C", str(workdir), f"PYTHON={sys.executable}", f"BASETEMP={workdir / 'tmp'}",
                  f"SESSION_ARGS={session_args}"],
                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pytest_pid, server_pid, qemu_pid, server_log = wait_for_pids(make, workdir / "pids")
    children = {"certrotate-server": int(server_pid), "QEMU (sleep stand-in)": int(qemu_pid)}
    try:
        if ending == "make-sigterm":
            make.send_signal(signal.SIGTERM)
        elif ending == "pytest-sigkill":
            os.kill(int(pytest_pid), signal.SIGKILL)
        output = make.communicate(timeout=30)[0]
        deadline = time.monotonic() + GONE_TIMEOUT
        while any(map(running, children.values())) and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = [name for name, pid in children.items() if running(pid)]
        assert not alive, f"still running {GONE_TIMEOUT} s after make exited: {alive}\n{output}"
        if ending == "make-sigterm":  # an orderly end: the backend fixture's finalizer stopped the server
            assert "shutting down" in Path(server_log).read_text(), output
    finally:
        make.kill()
        make.wait()
        for pid in (int(pytest_pid), *children.values()):
            if running(pid):
                os.kill(pid, signal.SIGKILL)
