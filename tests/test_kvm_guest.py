"""Real guest code under KVM: long mode, memory, port I/O, MMIO, kicks."""

from __future__ import annotations

import signal
import struct
import threading
import time

import pytest

from kvmmem.kvm import Vcpu, Vm, exits, x86

pytestmark = pytest.mark.kvm

MIB = 1 << 20
GDT_ADDR = 0x500
PML4_ADDR = 0x1000
CODE_ADDR = 0x10000
DATA_ADDR = 0x200000
MMIO_ADDR = 0xD0000000  # inside the identity map, outside every memslot

# Assembled with GNU as (intel syntax); each line: bytes ; instruction
GUEST_CODE = bytes.fromhex("".join([
    "48b88877665544332211",  # mov rax, 0x1122334455667788
    "48890425" "00002000",   # mov [0x200000], rax
    "488b1c25" "00002000",   # mov rbx, [0x200000]
    "89d8",                  # mov eax, ebx
    "66ba1000",              # mov dx, 0x10
    "ef",                    # out dx, eax
    "48c1eb20",              # shr rbx, 32
    "89d8",                  # mov eax, ebx
    "ef",                    # out dx, eax
    "be000000d0",            # mov esi, 0xd0000000
    "488b0e",                # mov rcx, [rsi]          (MMIO read)
    "48890c25" "08002000",   # mov [0x200008], rcx
    "e512",                  # in eax, 0x12
    "e713",                  # out 0x13, eax
    "f4",                    # hlt
]))
SPIN_CODE = bytes.fromhex("ebfe")  # jmp $


def boot(vm: Vm, host_buffer, code: bytes) -> tuple[Vcpu, object]:  # type: ignore[no-untyped-def]
    """4 MiB of RAM at 0 with GDT, page tables (4 GiB identity) and code."""
    ram = host_buffer(4 * MIB)
    vm.add_memslot(0, 4 * MIB, ram.address)
    ram.write(GDT_ADDR, x86.gdt_bytes())
    tables = x86.identity_page_tables(PML4_ADDR, 4 << 30)
    ram.write(PML4_ADDR, tables)
    ram.write(CODE_ADDR, code)
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    x86.setup_long_mode(sregs, PML4_ADDR, GDT_ADDR)
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags, regs.rsp = CODE_ADDR, 0x2, DATA_ADDR
    vcpu.set_regs(regs)
    return vcpu, ram


def test_page_tables_map_2mib_pages_identically() -> None:
    tables = x86.identity_page_tables(0x1000, 3 << 30)
    assert len(tables) == x86.page_table_size(3 << 30) == 4096 * 5
    pml4 = struct.unpack_from("<Q", tables, 0)[0]
    assert pml4 & ~0xFFF == 0x2000 and pml4 & 1
    pd_entry = struct.unpack_from("<Q", tables, 4096 * 2 + 8 * 700)[0]  # GiB 1, entry 188
    assert pd_entry & ~0xFFF == 700 * (2 << 20) and pd_entry & x86.PAGE_PS


def test_guest_writes_memory_does_io_and_mmio(vm: Vm, host_buffer) -> None:  # type: ignore[no-untyped-def]
    vcpu, ram = boot(vm, host_buffer, GUEST_CODE)
    sregs = vcpu.get_sregs()
    assert sregs.efer & x86.EFER_LMA and sregs.cr0 & x86.CR0_PG

    low = vcpu.run()
    assert isinstance(low, exits.IoExit) and low.is_write
    assert (low.port, low.size, low.count) == (0x10, 4, 1)
    assert struct.unpack("<I", low.data)[0] == 0x55667788
    high = vcpu.run()
    assert isinstance(high, exits.IoExit) and struct.unpack("<I", high.data)[0] == 0x11223344
    # the guest's store reached host memory through the memslot
    assert int.from_bytes(ram.read(DATA_ADDR, 8), "little") == 0x1122334455667788

    mmio = vcpu.run()
    assert isinstance(mmio, exits.MmioExit)
    assert (mmio.phys_addr, mmio.length, mmio.is_write) == (MMIO_ADDR, 8, False)
    vcpu.complete_mmio_read(struct.pack("<Q", 0xCAFEF00DDEADBEEF))

    inp = vcpu.run()
    assert isinstance(inp, exits.IoExit) and not inp.is_write and inp.port == 0x12
    assert vcpu.get_regs().rcx == 0xCAFEF00DDEADBEEF  # MMIO data landed in the register
    assert int.from_bytes(ram.read(DATA_ADDR + 8, 8), "little") == 0xCAFEF00DDEADBEEF
    vcpu.complete_io_in(struct.pack("<I", 0x0BADC0DE))

    echo = vcpu.run()
    assert isinstance(echo, exits.IoExit) and echo.port == 0x13
    assert struct.unpack("<I", echo.data)[0] == 0x0BADC0DE
    assert isinstance(vcpu.run(), exits.HltExit)
    assert vcpu.ioctl_counts["KVM_RUN"] == 6


def test_mmio_answer_of_wrong_size_is_refused(vm: Vm, host_buffer) -> None:  # type: ignore[no-untyped-def]
    vcpu, _ = boot(vm, host_buffer, GUEST_CODE)
    for _ in range(2):
        vcpu.run()
    assert isinstance(vcpu.run(), exits.MmioExit)
    with pytest.raises(ValueError):
        vcpu.complete_mmio_read(b"\x00" * 4)


def test_run_releases_the_gil_and_kick_stops_it(vm: Vm, host_buffer) -> None:  # type: ignore[no-untyped-def]
    vcpu, _ = boot(vm, host_buffer, SPIN_CODE)
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    result: list[exits.VcpuExit] = []
    try:
        thread = threading.Thread(target=lambda: result.append(vcpu.run()))
        thread.start()
        # While the guest spins inside KVM_RUN this thread keeps running Python.
        counter = 0
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            counter += 1
        assert thread.is_alive() and not result
        assert counter > 1000
        vcpu.kick()
        thread.join(10)
        assert not thread.is_alive()
        assert isinstance(result[0], exits.IntrExit)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert vcpu.get_regs().rip == CODE_ADDR  # still at `jmp $`


def test_triple_fault_is_a_shutdown_exit(vm: Vm, host_buffer) -> None:  # type: ignore[no-untyped-def]
    # ud2 with an empty IDT: #UD -> #DF -> triple fault
    vcpu, _ = boot(vm, host_buffer, bytes.fromhex("0f0b"))
    assert isinstance(vcpu.run(), exits.ShutdownExit)


def test_vcpu_fd_closed_with_vm(kvm, host_buffer) -> None:  # type: ignore[no-untyped-def]
    vm = kvm.create_vm()
    vcpu, _ = boot(vm, host_buffer, SPIN_CODE)
    vm.close()
    assert vcpu.closed and vm.closed


def test_irqchip_lapic_events_and_mp_state_round_trip(kvm, host_buffer) -> None:  # type: ignore[no-untyped-def]
    """The state a VMM saves at power-on and restores on reset."""
    from kvmmem.kvm import ffi, lib

    with kvm.create_vm() as vm:
        vm.create_irqchip()
        vcpu, _ = boot(vm, host_buffer, SPIN_CODE)
        ioapic = vm.get_irqchip(lib.KVM_IRQCHIP_IOAPIC)
        assert ioapic.chip_id == lib.KVM_IRQCHIP_IOAPIC
        vm.set_irqchip(ioapic)
        lapic = vcpu.get_lapic()
        svr = int.from_bytes(bytes(ffi.buffer(lapic.regs))[0xF0:0xF4], "little")
        vcpu.set_lapic(lapic)
        assert int.from_bytes(bytes(ffi.buffer(vcpu.get_lapic().regs))[0xF0:0xF4], "little") == svr
        vcpu.set_vcpu_events(vcpu.get_vcpu_events())
        vcpu.set_mp_state(lib.KVM_MP_STATE_RUNNABLE)
        assert vcpu.get_mp_state() == lib.KVM_MP_STATE_RUNNABLE
        vcpu.complete_pending()                  # nothing pending: returns at once
        assert vcpu.get_regs().rip == CODE_ADDR  # and ran no guest instruction
