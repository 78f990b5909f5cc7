"""The boot contract (kvmmem.vmm.boot) and the test guest booted on a bare VM."""

from __future__ import annotations

import signal
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmmem.kvm import x86
from kvmmem.memory import AddressSpace, GuestMemory, HostMemory, MemoryRegion, memory_transaction
from kvmmem.vmm import boot
from kvmmem.vmm.boot import BootError
from kvmmem.vmm.pc_layout import MachineMemoryMap

MIB, GIB = 1 << 20, 1 << 30
REPO = Path(__file__).resolve().parent.parent
GUEST_ELF = REPO / "build" / "guest" / "guest.elf"

# -- a tiny ELF writer for the pure tests ----------------------------------------


def pc_e820(ram_size: int) -> list[tuple[int, int, int]]:
    return MachineMemoryMap(ram_size).e820()


def make_elf(segments: list[tuple[int, bytes, int]], entry: int | None = None, *,
             ei_class: int = 2, machine: int = 62, e_type: int = 2) -> bytes:
    """An ELF64 file with one PT_LOAD per (paddr, data, memsz)."""
    phoff = 64
    data_off = phoff + 56 * len(segments)
    header = struct.pack("<16sHHIQQQIHHHHHH",
                         b"\x7fELF" + bytes([ei_class, 1, 1]) + bytes(9), e_type, machine, 1,
                         segments[0][0] if entry is None else entry, phoff, 0, 0, 64, 56,
                         len(segments), 64, 0, 0)
    phdrs, blobs = b"", b""
    for paddr, data, memsz in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, 5, data_off + len(blobs), paddr, paddr,
                             len(data), memsz, 0x1000)
        blobs += data
    return header + phdrs + blobs


class Recorder:
    """A write_phys that keeps every write."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def __call__(self, addr: int, data: bytes) -> None:
        self.writes.append((addr, data))


RAM = [(0, 64 * MIB)]
KERNEL = make_elf([(0x100000, b"\x90" * 100 + b"\xf4", 0x3000), (0x200000, b"data", 0x10)],
                  entry=0x100000)


# -- ELF loading ------------------------------------------------------------------


def test_load_elf64_copies_segments_and_zeroes_bss() -> None:
    rec = Recorder()
    assert boot.load_elf64(KERNEL, rec, RAM) == 0x100000
    assert rec.writes == [(0x100000, b"\x90" * 100 + b"\xf4" + bytes(0x3000 - 101)),
                          (0x200000, b"data" + bytes(12))]


def test_load_elf64_reads_a_path(tmp_path: Path) -> None:
    path = tmp_path / "kernel.elf"
    path.write_bytes(KERNEL)
    rec = Recorder()
    assert boot.load_elf64(path, rec, RAM) == 0x100000
    assert [a for a, _ in rec.writes] == [0x100000, 0x200000]
    with pytest.raises(BootError, match="cannot read kernel"):
        boot.load_elf64(tmp_path / "missing.elf", rec, RAM)


@pytest.mark.parametrize("image, reason", [
    (b"MZ\x90\x00" + bytes(100), "not an ELF file"),
    (make_elf([(0x100000, b"\xf4", 1)], ei_class=1), "not ELF64"),
    (make_elf([(0x100000, b"\xf4", 1)], machine=3), "not x86-64"),
    (make_elf([(0x100000, b"\xf4", 1)], e_type=3), "not an executable"),
    (make_elf([(0x100000, b"\xf4", 1)], entry=0x300000), "entry point 0x300000"),
    (make_elf([(0x100000, b"\xf4\xf4", 1)]), "file size"),
    (make_elf([(0x100000, b"\xf4", 0x2000), (0x101000, b"x", 1)]), "overlap"),
    (make_elf([(0x100000, b"\xf4", 1)])[:100], "truncated"),
])
def test_load_elf64_refuses_bad_images(image: bytes, reason: str) -> None:
    rec = Recorder()
    with pytest.raises(BootError, match=reason):
        boot.load_elf64(image, rec, RAM)
    assert rec.writes == []


def test_load_elf64_refuses_segments_outside_ram_and_on_reserved_ranges() -> None:
    rec = Recorder()
    beyond = make_elf([(0x100000, b"\xf4", 1), (64 * MIB - 8, b"x", 16)], entry=0x100000)
    with pytest.raises(BootError, match="not inside guest RAM"):
        boot.load_elf64(beyond, rec, RAM)
    with pytest.raises(BootError, match="overlaps the zero page"):
        boot.load_elf64(KERNEL, rec, RAM, reserved=[(0x101000, 0x1000, "zero page")])
    assert rec.writes == []
    with pytest.raises(TypeError):
        boot.load_elf64(12345, rec, RAM)  # type: ignore[arg-type]


# -- the zero page ------------------------------------------------------------------


def test_zero_page_fields_at_their_boot_protocol_offsets() -> None:
    e820 = [(0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (MIB, 511 * MIB, 1), (4 * GIB, GIB, 1)]
    page = boot.build_zero_page(e820, 0x1_2345_6000, 77)
    assert len(page) == 4096
    assert struct.unpack_from("<H", page, 0x1FE)[0] == 0xAA55          # boot_flag
    assert page[0x202:0x206] == b"HdrS"                                  # header
    assert struct.unpack_from("<H", page, 0x206)[0] == 0x020F           # version
    assert page[0x210] == 0xFF                                           # type_of_loader
    assert page[0x211] & 1                                               # LOADED_HIGH
    assert struct.unpack_from("<I", page, 0x228)[0] == 0x2345_6000      # cmd_line_ptr
    assert struct.unpack_from("<I", page, 0x0C8)[0] == 0x1              # ext_cmd_line_ptr
    assert struct.unpack_from("<I", page, 0x238)[0] == 77               # cmdline_size
    assert page[0x1E8] == 4                                              # e820_entries
    table = [struct.unpack_from("<QQI", page, 0x2D0 + 20 * i) for i in range(4)]
    assert table == e820
    assert page[0x1EF] == 0                                              # sentinel


@given(st.lists(st.tuples(st.integers(0, 1 << 40), st.integers(1, 1 << 40),
                          st.integers(1, 5)), max_size=128).map(
    lambda es: sorted({a: (a, s, k) for a, s, k in es}.values())))
def test_zero_page_e820_round_trip(entries: list[tuple[int, int, int]]) -> None:
    # overlapping RAM entries are refused; make them disjoint by spacing
    e820 = [(i << 41 | a, s, k) for i, (a, s, k) in enumerate(entries)]
    page = boot.build_zero_page(e820, 0x20000, 0)
    assert page[0x1E8] == len(e820)
    assert [struct.unpack_from("<QQI", page, 0x2D0 + 20 * i) for i in range(len(e820))] == e820
    assert page[0x2D0 + 20 * len(e820):0xCD0] == bytes(0xCD0 - 0x2D0 - 20 * len(e820))


@pytest.mark.parametrize("e820, reason", [
    ([(i * GIB, MIB, 1) for i in range(129)], "129 e820 entries"),
    ([(0, 0, 1)], "bad e820 entry"),
    ([(0, 2 * MIB, 1), (MIB, 2 * MIB, 1)], "overlap"),
])
def test_zero_page_refuses_bad_e820(e820: list[tuple[int, int, int]], reason: str) -> None:
    with pytest.raises(BootError, match=reason):
        boot.build_zero_page(e820, 0x20000, 0)


# -- the boot layout -------------------------------------------------------------------


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_prepare_boot_lays_out_the_documented_structures() -> None:
    ram = 512 * MIB
    plan = boot.prepare_boot(KERNEL, "console=ttyS0 x=1", pc_e820(ram), 0x10480000000)
    lay = plan.layout
    assert (lay.entry, lay.gdt, lay.zero_page, lay.cmdline) == (0x100000, 0x500, 0x7000, 0x20000)
    assert lay.page_tables_size == x86.page_table_size(0x10480000000)
    assert lay.page_tables + lay.page_tables_size <= ram and lay.page_tables % 4096 == 0
    assert lay.page_tables > ram - lay.page_tables_size - 4096   # at the top of RAM
    writes = dict(plan.writes)
    assert writes[0x500] == x86.gdt_bytes()
    assert writes[0x20000] == b"console=ttyS0 x=1\0"
    zp = writes[0x7000]
    assert struct.unpack_from("<I", zp, 0x228)[0] == 0x20000
    assert struct.unpack_from("<I", zp, 0x238)[0] == len("console=ttyS0 x=1")
    tables = writes[lay.page_tables]
    pml4e = struct.unpack_from("<Q", tables, 0)[0]
    assert pml4e & ~0xFFF == lay.page_tables + 4096
    spans = sorted((a, a + len(d)) for a, d in plan.writes)
    assert not any(_overlaps(x, y) for x, y in zip(spans, spans[1:]))


def test_page_tables_avoid_a_kernel_at_the_top_of_ram() -> None:
    ram = 64 * MIB
    top = make_elf([(0x100000, b"\xf4", 1), (ram - 4 * MIB, b"x", 4 * MIB)], entry=0x100000)
    lay = boot.prepare_boot(top, "", pc_e820(ram), 8 * GIB).layout
    assert lay.page_tables + lay.page_tables_size <= ram - 4 * MIB
    assert lay.page_tables >= MIB


@pytest.mark.parametrize("kernel, cmdline, e820, map_size, reason", [
    (make_elf([(0x7000, b"\xf4", 1)]), "", pc_e820(64 * MIB), 4 * GIB, "zero page"),
    (make_elf([(0x20100, b"\xf4", 1)]), "", pc_e820(64 * MIB), 4 * GIB, "command line"),
    (KERNEL, "x" * 4096, pc_e820(64 * MIB), 4 * GIB, "at most 4095 bytes"),
    (KERNEL, "a\0b", pc_e820(64 * MIB), 4 * GIB, "NUL"),
    (KERNEL, "", pc_e820(4 * GIB), 4 * GIB, "must cover all RAM"),
    (KERNEL, "", pc_e820(64 * MIB), 1 << 49, "at most"),
    (KERNEL, "", [(0x100000, 64 * MIB, 1)], 4 * GIB, "not in e820 RAM"),
    (make_elf([(0x100000, b"\xf4", 63 * MIB)]), "", [(0, 64 * MIB, 1)], 1 << 46, "no room"),
])
def test_prepare_boot_refuses_conflicts(kernel: bytes, cmdline: str,
                                        e820: list[tuple[int, int, int]], map_size: int,
                                        reason: str) -> None:
    with pytest.raises(BootError, match=reason):
        boot.prepare_boot(kernel, cmdline, e820, map_size)


def test_pc_layout_gives_e820_boot_ram_and_identity_map_end() -> None:
    layout = MachineMemoryMap(4 * GIB, maxmem=8 * GIB)
    assert layout.e820() == [(0, 0x9FC00, 1), (MIB, 3 * GIB - MIB, 1), (4 * GIB, GIB, 1)]
    assert [(r.range.start, r.range.size, r.ram_offset) for r in layout.boot_ram()] == [
        (0, 3 * GIB, 0), (4 * GIB, GIB, 3 * GIB)]
    # device memory (4 GiB from 5 GiB) is the kernel's to map: boot RAM only
    assert layout.identity_map_end == 5 * GIB and layout.end == 9 * GIB
    huge = MachineMemoryMap(256 * MIB, maxmem=64 * 1024 * GIB)
    assert huge.identity_map_end == 4 * GIB and huge.end > 64 * 1024 * GIB
    assert MachineMemoryMap(64 * MIB).identity_map_end == 4 * GIB
    assert MachineMemoryMap(64 * MIB).e820() == [(0, 0x9FC00, 1), (MIB, 63 * MIB, 1)]
    with pytest.raises(BootError):
        MachineMemoryMap(MIB).e820()


def test_guest_writer_writes_ram_and_refuses_the_rest() -> None:
    ram = HostMemory(8 * MIB, "ram")
    try:
        root = MemoryRegion.container("system", 1 << 64)
        with memory_transaction():
            root.add_subregion(0, MemoryRegion.alias("low", MemoryRegion.ram("pc.ram", ram),
                                                      0, 6 * MIB))
        space = AddressSpace(root, "memory")
        write = boot.guest_writer(GuestMemory(space))
        write(0x1000, b"low")
        assert ram.read(0x1000, 3) == b"low"
        for addr in (6 * MIB - 1, 4 * GIB):
            with pytest.raises(BootError, match="not .*RAM"):
                write(addr, b"xyz")
        assert ram.read(6 * MIB - 1, 1) == b"\0"
        space.destroy()
    finally:
        ram.close()


# -- the test guest on a bare VM (no virtio device) ------------------------------------

BARE_RAM = 32 * MIB
MAX_EXITS = 200_000
WATCHDOG_S = 60.0


@pytest.fixture(scope="module")
def guest_elf() -> Path:
    """Build the guest with its make fragment, as the top Makefile does."""
    result = subprocess.run(["make", "-s", "-f", "tests/guest/Makefile.inc", "build/guest/guest.elf"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"building the test guest failed:\n{result.stderr}"
    return GUEST_ELF


@dataclass
class GuestRun:
    output: str
    exit_value: int
    mmio_reads: list[int]

    @property
    def exit_status(self) -> int:
        """What QEMU's isa-debug-exit (and kvmmem's VMM) exits the process with."""
        return (self.exit_value << 1) | 1


@pytest.fixture
def bare_vm(kvm: Any) -> Iterator[tuple[Any, Any]]:
    from kvmmem.memory import HostMemory

    ram = HostMemory(BARE_RAM, "bare.ram")
    vm = kvm.create_vm()
    try:
        vm.create_irqchip()
        vm.add_memslot(0, BARE_RAM, ram.address)
        yield vm, ram
    finally:
        vm.close()
        ram.close()


def run_guest(kvm: Any, vm: Any, ram: Any, elf: Path, cmdline: str) -> GuestRun:
    """Boot ``elf`` and serve the UART and isa-debug-exit until it exits.

    MMIO reads (a probe of an announced device) are answered with zeros.
    """
    from kvmmem.kvm import exits

    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid2(kvm.get_supported_cpuid())
    layout = boot.boot(vcpu, ram.write, elf, cmdline, pc_e820(BARE_RAM), 4 * GIB)
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    assert (regs.rip, regs.rsi, regs.rflags) == (layout.entry, 0x7000, 2)
    assert (sregs.cs.selector, sregs.ds.selector, sregs.cr3) == (0x10, 0x18, layout.page_tables)

    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    watchdog = threading.Timer(WATCHDOG_S, vcpu.kick)
    watchdog.start()
    out, mmio_reads = bytearray(), []
    try:
        for _ in range(MAX_EXITS):
            ex = vcpu.run()
            if isinstance(ex, exits.IoExit) and ex.is_write:
                if ex.port == 0x3F8:
                    out += ex.data
                elif ex.port == 0xF4:
                    return GuestRun(out.decode(), ex.data[0], mmio_reads)
            elif isinstance(ex, exits.IoExit):
                value = 0x60 if ex.port == 0x3FD else 0xFF   # LSR: transmitter empty
                vcpu.complete_io_in(bytes([value]) * (ex.size * ex.count))
            elif isinstance(ex, exits.MmioExit):
                if not ex.is_write:
                    mmio_reads.append(ex.phys_addr)
                    vcpu.complete_mmio_read(bytes(ex.length))
            else:
                pytest.fail(f"guest stopped with {ex!r} at rip {vcpu.get_regs().rip:#x}; "
                            f"output so far:\n{out.decode(errors='replace')}")
        pytest.fail(f"guest did not exit within {MAX_EXITS} exits:\n{out.decode(errors='replace')}")
    finally:
        watchdog.cancel()
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.kvm
def test_guest_without_device_says_so_and_fails(kvm: Any, bare_vm: Any, guest_elf: Path) -> None:
    vm, ram = bare_vm
    cmdline = "console=ttyS0 kvmmem.steps=3"
    run = run_guest(kvm, vm, ram, guest_elf, cmdline)
    lines = run.output.splitlines()
    assert lines[0] == f'kvmmem-guest: cmdline "{cmdline}"'   # cmd_line_ptr reached the guest
    ram_bytes = sum(size for _, size, _ in pc_e820(BARE_RAM))
    assert lines[1] == f"e820: 2 entries, ram={ram_bytes}"      # so did the e820 table
    assert lines[-1] == "no virtio-mmio device"
    assert (run.exit_value, run.exit_status) == (1, 3)
    assert run.mmio_reads == []


@pytest.mark.kvm
def test_guest_stops_at_once_with_zero_steps(kvm: Any, bare_vm: Any, guest_elf: Path) -> None:
    vm, ram = bare_vm
    run = run_guest(kvm, vm, ram, guest_elf, "kvmmem.steps=0")
    assert run.output.splitlines()[-1] == "done"
    assert (run.exit_value, run.exit_status) == (0, 1)


@pytest.mark.kvm
def test_guest_probes_each_announced_device(kvm: Any, bare_vm: Any, guest_elf: Path) -> None:
    vm, ram = bare_vm
    cmdline = "virtio_mmio.device=4K@0xd0000000:5 quiet virtio_mmio.device=0x200@0xd0001000:6"
    run = run_guest(kvm, vm, ram, guest_elf, cmdline)
    # magic, version and device id of both devices, nothing else: no device answers
    assert run.mmio_reads == [0xD0000000, 0xD0000004, 0xD0000008,
                              0xD0001000, 0xD0001004, 0xD0001008]
    assert "virtio-mmio at 0xd0000000 irq 5: bad magic 0x0 or version 0" in run.output
    assert "virtio-mmio at 0xd0001000 irq 6: bad magic 0x0 or version 0" in run.output
    assert run.output.splitlines()[-1] == "no virtio-mem device"
    assert run.exit_value == 1
