"""A vCPU exit the VMM cannot go on from stops the vCPU, as QEMU does.

A guest that executes from the virtio-mmio window makes KVM give up
(KVM_EXIT_INTERNAL_ERROR, emulation failure). Like QEMU's
``kvm_handle_internal_error`` + ``vm_stop(RUN_STATE_INTERNAL_ERROR)``, the
machine reports it once, in one line with the exit's data, stops the vCPU
and sends STOP; QMP keeps answering (``query-status`` says
``internal-error``), ``cont`` is refused until a reset, ``system_reset``
runs the guest again and ``quit`` quits. Failed entries, unknown exits,
memory faults and a failing KVM_RUN take the same path; a triple fault
resets the machine, as before.
"""

from __future__ import annotations

import errno
import logging
import threading
from pathlib import Path

import pytest
from qmp_client import QmpClient
from tiny_guest import elf, exit_with, first_boot_then, jump_to, say

from kvmmem.devices.virtio_mem import VirtioMemProps
from kvmmem.kvm import KvmError, exits, lib
from kvmmem.memory import HostMemory
from kvmmem.vmm.machine import INTERNAL_ERROR_STATUS, MMIO_BASE, Machine, MachineConfig
from kvmmem.vmm.qmp import QmpServer

pytestmark = pytest.mark.kvm

MiB, GiB = 1 << 20, 1 << 30
TIMEOUT = 30
# First boot: execute from the virtio-mmio window; later boots: say so and exit 3 (status 7).
MMIO_FETCH_GUEST = first_boot_then(say(b"first\n") + jump_to(MMIO_BASE),
                                   say(b"again\n") + exit_with(3))


class Vmm:
    """A machine with one virtio-mem device running a tiny guest in a thread."""

    def __init__(self, tmp_path: Path, code: bytes) -> None:
        kernel = tmp_path / "tiny.elf"
        kernel.write_bytes(elf(code))
        self.output = bytearray()
        device = VirtioMemProps(id="vmem0", memdev=HostMemory(GiB, "mem0"))
        self.machine = Machine(MachineConfig(ram_size=64 * MiB, kernel=str(kernel),
                                             maxmem=64 * MiB + 2 * GiB,
                                             memory_devices=[device], serial=self.output.extend))
        self.status: list[int] = []
        self.thread = threading.Thread(target=lambda: self.status.append(self.machine.run()))

    def close(self) -> None:
        if self.thread.is_alive():
            self.machine.shutdown(1)
            self.thread.join(TIMEOUT)
        self.machine.close()


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("then", ["system_reset", "quit"])
def test_internal_error_stops_the_vcpu_and_qmp_resets_or_quits(tmp_path, caplog, then) -> None:  # type: ignore[no-untyped-def]
    vmm = Vmm(tmp_path, MMIO_FETCH_GUEST)
    server = QmpServer(vmm.machine, tmp_path / "qmp.sock")
    server.start()
    try:
        client = QmpClient(tmp_path / "qmp.sock")
        vmm.thread.start()
        assert client.until("STOP") == ["STOP"]
        assert client.execute("query-status") == {"status": "internal-error", "running": False}
        [message] = _errors(caplog)                                   # reported once
        assert message.startswith(f"vCPU 0 at rip {MMIO_BASE:#x}: KVM internal error, "
                                  "suberror 1 (emulation failure)")
        assert ", ndata " in message and ", data 0x" in message
        assert message.endswith("; the vCPU is stopped (internal-error) until a system reset")
        assert message.startswith(vmm.machine.internal_error)
        assert bytes(vmm.output) == b"first\n"

        assert client.execute("human-monitor-command", **{"command-line": "info status"}) == \
            "VM status: paused (internal-error)\r\n"
        assert client.ask("cont")["error"]["desc"] == "Resetting the Virtual Machine is required"
        assert client.execute("stop") == {}                           # already stopped
        [info] = client.execute("query-memory-devices")               # QMP still answers
        assert info["data"]["id"] == "vmem0"
        assert vmm.thread.is_alive() and not vmm.status

        client.execute(then)
        if then == "system_reset":
            assert client.until("RESUME") == ["RESET", "RESUME"]
            vmm.thread.join(TIMEOUT)
            assert vmm.status == [7] and bytes(vmm.output) == b"first\nagain\n"
            assert vmm.machine.resets == 1 and vmm.machine.internal_error is None
        else:
            assert client.until("SHUTDOWN") == ["SHUTDOWN"]
            vmm.thread.join(TIMEOUT)
            assert vmm.status == [0]
        assert client.events == [] and len(_errors(caplog)) == 1
        client.close()
    finally:
        server.close()
        vmm.close()


def test_without_a_monitor_run_reports_the_internal_error_and_returns(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    vmm = Vmm(tmp_path, MMIO_FETCH_GUEST)
    try:
        assert vmm.machine.run() == INTERNAL_ERROR_STATUS
        [message] = _errors(caplog)
        assert f"rip {MMIO_BASE:#x}: KVM internal error" in message
        assert message.endswith("; stopping the machine")
    finally:
        vmm.close()


def test_a_triple_fault_resets_the_machine(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """KVM_EXIT_SHUTDOWN is QEMU's guest reset (ud2 with no IDT: triple fault)."""
    vmm = Vmm(tmp_path, first_boot_then(b"\x0f\x0b", say(b"again\n") + exit_with(3)))
    try:
        assert vmm.machine.run() == 7
        assert vmm.machine.resets == 1 and bytes(vmm.output) == b"again\n"
        assert _errors(caplog) == []
    finally:
        vmm.close()


FATAL_EXITS = {
    "fail-entry": (exits.FailEntryExit(lib.KVM_EXIT_FAIL_ENTRY, 0x80000021, 1),
                   "KVM_EXIT_FAIL_ENTRY), hardware entry failure reason 0x80000021 on host cpu 1"),
    "unknown": (exits.OtherExit(99, 0x1234),
                "unhandled KVM exit reason 99 (hardware exit reason 0x1234)"),
    "memory-fault": (exits.MemoryFaultExit(lib.KVM_EXIT_MEMORY_FAULT, 0, 0x7000, 0x1000),
                     "KVM memory fault at 0x7000 (+0x1000, flags 0x0)"),
    "run-failed": (KvmError(errno.EFAULT, "KVM_RUN"), "KVM_RUN failed: [EFAULT]"),
}


@pytest.mark.parametrize("kind", sorted(FATAL_EXITS))
def test_other_fatal_exits_take_the_internal_error_path(tmp_path, caplog, kind: str) -> None:  # type: ignore[no-untyped-def]
    """Exits real hardware gives rarely, delivered once in place of the real
    vCPU's first exit; everything else is the real machine and guest."""
    fake, text = FATAL_EXITS[kind]
    vmm = Vmm(tmp_path, say(b"ran\n") + exit_with(3))
    machine, real_run = vmm.machine, vmm.machine.vcpu.run
    stopped = threading.Event()
    machine.stop_on_internal_error = True
    machine.internal_error_notifiers.add(lambda message: stopped.set())

    def run_once_fake() -> exits.VcpuExit:
        machine.vcpu.run = real_run                          # type: ignore[method-assign]
        if isinstance(fake, KvmError):
            raise fake
        return fake

    machine.vcpu.run = run_once_fake                         # type: ignore[method-assign]
    try:
        vmm.thread.start()
        assert stopped.wait(TIMEOUT)
        [message] = _errors(caplog)
        assert text in message and message.startswith(machine.internal_error)
        assert machine.paused and vmm.thread.is_alive()
        with pytest.raises(RuntimeError, match="reset the machine"):
            machine.resume()
        machine.request_reset()
        vmm.thread.join(TIMEOUT)
        assert vmm.status == [7] and bytes(vmm.output) == b"ran\n"
    finally:
        vmm.close()
