"""The VM harness itself, on real QEMU (no guest boots here)."""

from __future__ import annotations

import socket

import pytest

import qemu_vm
from qemu_vm import VM

pytestmark = pytest.mark.timeout(120)


def test_ssh_port_lost_to_another_socket(qemu_prerequisites, tmp_path, monkeypatch):
    """free_port() releases the port before QEMU binds it; if another socket takes
    it first, QEMU starts again on a new port instead of failing the boot."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        lost = taken.getsockname()[1]
        ports = [lost]
        monkeypatch.setattr(qemu_vm, "free_port", lambda real=qemu_vm.free_port: ports.pop() if ports else real())
        # A blank disk: the firmware finds nothing to boot and waits, so no ssh ever answers.
        disk = tmp_path / "blank.img"
        disk.write_bytes(bytes(1024 * 1024))
        vm = VM(disk, tmp_path / "vm", tmp_path / "key")
        vm.start()
        try:
            with pytest.raises(TimeoutError, match="no ssh to the guest"):
                vm.wait_ssh(timeout=10)
            assert vm.process.poll() is None, "QEMU on the new port is not running"
        finally:
            vm.power_cut()
    log = (tmp_path / "vm" / "qemu.log").read_text()
    assert f"Could not set up host forwarding rule 'tcp:127.0.0.1:{lost}-:22'" in log, log
    assert vm.port != lost
    assert vm.boots == 1
