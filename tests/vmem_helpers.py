"""Helpers shared by the virtio-mem device tests: a small machine, requests, guests."""

from __future__ import annotations

import struct

from kvmmem.devices.plug_bitmap import PlugBitmap
from kvmmem.devices.virtio_mem import VirtioMem, VirtioMemProps
from kvmmem.devices.virtio_mem_proto import Request, RequestType, Response
from kvmmem.kvm import Vcpu, Vm, exits, x86
from kvmmem.memory import HostMemory
from kvmmem.vmm.machine_memory import MachineMemory

MiB = 1 << 20
GiB = 1 << 30

PLUG, UNPLUG, UNPLUG_ALL, STATE = (RequestType.PLUG, RequestType.UNPLUG,
                                   RequestType.UNPLUG_ALL, RequestType.STATE)


def small_machine(vm: Vm) -> MachineMemory:
    """1 GiB of boot RAM and 63 GiB of device memory from 4 GiB."""
    return MachineMemory(vm, 1 * GiB, maxmem=64 * GiB)


def plug_device(machine: MachineMemory, size: int = 8 * GiB, block: int = 128 * MiB,
                dev_id: str = "vmem0", **props) -> VirtioMem:  # type: ignore[no-untyped-def]
    dev = VirtioMem(VirtioMemProps(id=dev_id, memdev=HostMemory(size, f"mem-{dev_id}"),
                                   block_size=block, **props))
    machine.plug(dev)
    return dev


def request(dev: VirtioMem, type: RequestType, block: int = 0, n: int = 1,
            addr: int | None = None) -> Response:
    """Send one request for ``n`` blocks from block index ``block``."""
    if addr is None:
        addr = dev.addr + block * dev.block_size
    raw = dev.handle(0, Request(type, addr, n).pack(), 10)
    assert raw is not None, "a well-formed request must be answered"
    return Response.parse(raw)


def kvm_ranges(vm: Vm, dev: VirtioMem) -> set[tuple[int, int]]:
    """(guest address, size) of every KVM memslot inside the device."""
    end = dev.addr + dev.region_size
    return {(s.guest_phys_addr, s.memory_size) for s in vm.memslots.values()
            if dev.addr <= s.guest_phys_addr < end}


def expected_ranges(dev: VirtioMem, indices) -> set[tuple[int, int]]:  # type: ignore[no-untyped-def]
    size = dev.memslot_size
    return {(dev.addr + i * size, min(size, dev.region_size - i * size)) for i in indices}


# mov rax, [rsi]; out 0x10, eax; shr rax, 32; out 0x10, eax; hlt
READ_CODE = bytes.fromhex("488b06" "e710" "48c1e820" "e710" "f4")
CODE, GDT, PML4 = 0x10000, 0x500, 0x1000


class GuestReader:
    """A vCPU whose guest reads one 8-byte word at a chosen address and
    reports it on port 0x10 (or exits trying)."""

    def __init__(self, vm: Vm, machine: MachineMemory, map_size: int) -> None:
        ram = machine.ram_host
        ram.write(GDT, x86.gdt_bytes())
        ram.write(PML4, x86.identity_page_tables(PML4, map_size))
        ram.write(CODE, READ_CODE)
        self.vcpu: Vcpu = vm.create_vcpu(0)
        sregs = self.vcpu.get_sregs()
        x86.setup_long_mode(sregs, PML4, GDT)
        self.vcpu.set_sregs(sregs)

    def read(self, gpa: int) -> tuple[int | None, exits.VcpuExit | None]:
        """(value the guest read, the exit its access caused or None).

        An MMIO exit is answered with all ones, as unassigned memory reads;
        a memory-fault exit cannot be answered, so the value is None then.
        """
        regs = self.vcpu.get_regs()
        regs.rip, regs.rflags, regs.rsi = CODE, 2, gpa
        self.vcpu.set_regs(regs)
        trap: exits.VcpuExit | None = None
        first = self.vcpu.run()
        if isinstance(first, exits.MmioExit):
            trap = first
            self.vcpu.complete_mmio_read(b"\xff" * first.length)
            first = self.vcpu.run()
        if not isinstance(first, exits.IoExit):
            return None, first
        second = self.vcpu.run()
        assert isinstance(second, exits.IoExit)
        assert isinstance(self.vcpu.run(), exits.HltExit)
        return struct.unpack("<Q", first.data + second.data)[0], trap


def memslots_to_map(mode: str, memslot_size: int, region_size: int, usable_region_size: int,
                    bitmap: PlugBitmap | None) -> frozenset[int]:
    """The grid memslots a mode must map, computed here from the mode's
    definition (independently of the device's policy objects)."""
    if mode == "single":
        return frozenset({0})
    if mode == "usable":
        return frozenset(range(-(-usable_region_size // memslot_size)))
    assert bitmap is not None
    per_slot = memslot_size // (region_size // bitmap.nb_blocks)
    return frozenset(b // per_slot for first, n in bitmap.plugged_runs()
                     for b in range(first, first + n))


def exact_ranges(dev: VirtioMem) -> set[tuple[int, int]]:
    """(guest address, size) of the memslots ``memslots=exact`` must hold,
    computed here from the mode's definition: each run of plugged blocks cut
    into maximal aligned chunks whose size is the block size or a power of 8
    bytes, at most 8 grid memslots, outside the grid memslots the device
    mapped whole (its budget fallback); and those."""
    bits, bs, grid = dev.bitmap, dev.block_size, dev.memslot_size
    assert bits is not None and dev.policy is not None
    coarse = dev.policy.cover.coarse_cells  # type: ignore[attr-defined]
    sizes = sorted({bs} | {1 << e for e in range(bs.bit_length(), 64, 1)
                           if e % 3 == 0 and (1 << e) <= 8 * grid and (1 << e) >= bs}, reverse=True)
    ranges = {(dev.addr + c * grid, min(grid, dev.region_size - c * grid)) for c in coarse}
    for first, n in bits.plugged_runs():
        pos, end = first * bs, (first + n) * bs
        while pos < end:
            if pos // grid in coarse:
                pos = (pos // grid + 1) * grid
                continue
            stop = min(end, next((c * grid for c in sorted(coarse) if c * grid > pos), end))
            size = next(s for s in sizes if pos % s == 0 and pos + s <= stop)
            ranges.add((dev.addr + pos, size))
            pos += size
    return ranges
