"""The test guest boots under KVM and drives virtio-mem over virtio-mmio.

Real guest code, real memslots: after every step the guest reports, the
KVM memslots must be exactly what the device's mode says, the guest's
patterns in plugged memory must hold, and a reboot must unplug everything.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from serial_lines import SerialLines
from vmem_helpers import GiB, MiB, exact_ranges, expected_ranges, kvm_ranges, memslots_to_map

from kvmmem.devices.virtio_mem import VirtioMemProps
from kvmmem.memory import HostMemory
from kvmmem.vmm.machine import Machine, MachineConfig, MachineExit

pytestmark = pytest.mark.kvm

STEP = re.compile(r"plugged=(\d+) requested=(\d+) ok")


class Run:
    """A machine whose UART lines go to ``on_line``."""

    def __init__(self, guest: Path, on_line: Callable[[Run, str], None], cmdline: str = "",
                 device_size: int = 4 * GiB, **props) -> None:  # type: ignore[no-untyped-def]
        self._serial = SerialLines(lambda line: on_line(self, line))
        self.lines = self._serial.lines
        props.setdefault("requested_size", GiB)
        device = VirtioMemProps(id="vmem0", memdev=HostMemory(device_size, "mem0"), **props)
        self.machine = Machine(MachineConfig(ram_size=512 * MiB, kernel=str(guest),
                                             maxmem=512 * MiB + 8 * GiB, cmdline=cmdline,
                                             memory_devices=[device], serial=self._serial))
        self.dev = self.machine.devices["vmem0"]

    def run(self) -> int:
        try:
            return self.machine.run()
        finally:
            self.machine.close()

    def check_memslots(self) -> None:
        dev, vm = self.dev, self.machine.vm
        wanted = memslots_to_map(dev.props.memslots, dev.memslot_size, dev.region_size,
                                 dev.usable_region_size, dev.bitmap)
        if dev.props.memslots.value == "single":
            assert kvm_ranges(vm, dev) == {(dev.addr, dev.region_size)}
        elif dev.props.memslots.value == "exact":
            assert kvm_ranges(vm, dev) == exact_ranges(dev)
        else:
            assert kvm_ranges(vm, dev) == expected_ranges(dev, wanted)


MODES = [("single", "slot"), ("usable", "slot"), ("dynamic", "slot"), ("dynamic", "block"),
         ("exact", "slot"), ("exact", "block")]


@pytest.mark.parametrize("mode,protect", MODES)
def test_guest_follows_requested_size_through_grow_shrink_and_reboot(guest_elf, mode, protect) -> None:  # type: ignore[no-untyped-def]
    plan = [2 * GiB + 128 * MiB, 384 * MiB, "reboot", 0]
    seen: list[tuple[int, int]] = []

    def on_line(run: Run, line: str) -> None:
        assert "mismatch" not in line and "error" not in line, line
        step = STEP.search(line)
        if step:
            plugged, requested = int(step[1]), int(step[2])
            assert plugged == run.dev.plugged_size and requested == run.dev.requested_size
            run.check_memslots()
            if plugged == requested:
                seen.append((plugged, run.machine.resets))
        if line == "waiting for a config change":
            if not plan:
                raise MachineExit(0)
            action = plan.pop(0)
            if action == "reboot":
                run.machine.request_reset()
            else:
                run.dev.set_requested_size(action)

    run = Run(guest_elf, on_line, memslots=mode, protect=protect)
    assert run.run() == 0
    assert seen == [(GiB, 0), (2 * GiB + 128 * MiB, 0), (384 * MiB, 0), (384 * MiB, 1), (0, 1)]
    assert any(line.startswith("virtio-mem: features=") and " block_size=2097152" in line
               for line in run.lines)


@pytest.mark.parametrize("protect", ["slot", "block"])
def test_guest_read_of_unplugged_block_is_reported_and_reads_all_ones(guest_elf, protect) -> None:  # type: ignore[no-untyped-def]
    def on_line(run: Run, line: str) -> None:
        if line == "waiting for a config change":
            raise MachineExit(0)

    run = Run(guest_elf, on_line, cmdline="kvmmem.read_unplugged=1", memslots="dynamic",
              protect=protect, requested_size=256 * MiB)
    far = run.dev.addr + run.dev.region_size - run.dev.block_size     # memslot not mapped
    near = run.dev.addr + 128 * MiB               # after the first step's blocks, memslot 0
    assert run.run() == 0
    reads = dict(re.findall(r"read (0x[0-9a-f]+) = (0x[0-9a-f]+)", "\n".join(run.lines)))
    assert len(reads) == 2
    reported = {a.address: a for a in run.machine.unplugged_accesses}
    assert int(reads[hex(far)], 16) == 2**64 - 1
    assert reported[far].device == "vmem0" and reported[far].vcpu == 0
    if protect == "block":
        assert int(reads[hex(near)], 16) == 2**64 - 1 and near in reported
    else:
        assert int(reads[hex(near)], 16) == 0 and near not in reported


@pytest.mark.parametrize("how", ["short", "type", "desc", "loop"])
def test_malformed_guest_input_sets_needs_reset_and_vmm_survives(guest_elf, how: str) -> None:  # type: ignore[no-untyped-def]
    run = Run(guest_elf, lambda run, line: None, cmdline=f"kvmmem.malformed={how}")
    transport = run.machine.transports[0]
    assert run.run() == 1                     # the guest wrote 0 to the debug-exit port
    assert transport.needs_reset
    line = next(x for x in run.lines if x.startswith(f"malformed {how}"))
    assert int(line.rsplit("status=", 1)[1], 16) & 0x40
    assert run.dev.plugged_size == 0


def test_machine_is_controlled_from_another_thread(guest_elf) -> None:  # type: ignore[no-untyped-def]
    """The vCPU runs in its own thread; the main thread resizes, pauses,
    resets and stops the machine, as a QMP server would."""
    import threading

    waiting = threading.Semaphore(0)

    def on_line(run: Run, line: str) -> None:
        if line == "waiting for a config change":
            waiting.release()

    run = Run(guest_elf, on_line, memslots="dynamic")
    machine, dev = run.machine, run.dev
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(machine.run()))
    thread.start()
    try:
        assert waiting.acquire(timeout=30) and dev.plugged_size == GiB
        machine.pause()
        with machine.lock:
            dev.set_requested_size(512 * MiB)
        assert machine.paused and dev.plugged_size == GiB       # the guest cannot react
        machine.resume()
        assert waiting.acquire(timeout=30) and dev.plugged_size == 512 * MiB
        machine.request_reset()
        assert waiting.acquire(timeout=30) and machine.resets == 1
        assert dev.plugged_size == 512 * MiB                      # re-plugged after reboot
        machine.pause()
        machine.request_reset()                                   # paused: reset at once
        assert machine.resets == 2 and dev.plugged_size == 0
        machine.resume()
        assert waiting.acquire(timeout=30) and dev.plugged_size == 512 * MiB
        machine.shutdown(7)
        thread.join(30)
        assert result == [7]
    finally:
        if thread.is_alive():
            machine.shutdown(1)
            thread.join(30)
        machine.close()


def test_guest_reset_through_port_0x64_reboots_with_everything_unplugged(guest_elf) -> None:  # type: ignore[no-untyped-def]
    boots: list[int] = []

    def on_line(run: Run, line: str) -> None:
        if line.startswith("virtio-mem: features="):
            boots.append(run.dev.plugged_size)          # what the new guest finds
            assert " plugged=0 " in line
        if line == "resetting" and run.machine.resets == 2:
            raise MachineExit(0)

    run = Run(guest_elf, on_line, cmdline="kvmmem.reset=1", memslots="dynamic",
              requested_size=256 * MiB)
    assert run.run() == 0
    assert boots == [0, 0, 0] and run.machine.resets == 2


def test_reset_restores_the_power_on_pit(guest_elf) -> None:  # type: ignore[no-untyped-def]
    """A timer the old guest programmed must not tick into the new one."""
    run = Run(guest_elf, lambda run, line: None)
    vm = run.machine.vm
    try:
        def channel0() -> tuple[int, int, int]:
            c = vm.get_pit2().channels[0]
            return c.count, c.mode, c.rw_mode

        power_on = channel0()
        state = vm.get_pit2()
        state.channels[0].mode, state.channels[0].count, state.channels[0].rw_mode = 2, 1193, 3
        vm.set_pit2(state)                        # as a guest programming a 1 kHz tick
        assert channel0() == (1193, 2, 3) != power_on
        run.machine.reset()
        assert channel0() == power_on
    finally:
        run.machine.close()
