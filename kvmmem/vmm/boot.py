"""The boot contract: Linux's x86-64 boot protocol with 64-bit entry.

A kernel is an ELF64 x86-64 executable (a Linux ``vmlinux`` or the test guest
of ``tests/guest``); its PT_LOAD segments are copied to their physical
addresses (``p_paddr``), the rest of each segment (``.bss``) is zeroed, and
the vCPU starts at ``e_entry`` in 64-bit mode, as Linux's
``Documentation/arch/x86/boot.rst`` ("64-bit boot protocol") asks:

======================  ====================================================
guest-physical          contents
======================  ====================================================
0x00500 - 0x0051f       GDT: null, unused, ``__BOOT_CS`` 0x10 (64-bit code),
                        ``__BOOT_DS`` 0x18 (flat data)
0x07000 - 0x07fff       zero page (``struct boot_params``)
0x08000 - 0x08fff       a scratch stack (RSP = 0x9000; kernels set their own)
0x20000 - 0x20fff       command line, NUL-terminated (at most 4095 bytes)
top of RAM below 4 GiB  identity page tables, 2 MiB pages, [0, map_size):
                        PML4, PDPTs, one page directory per GiB (placed at the
                        highest RAM below 4 GiB not used by the kernel);
                        the pc machine's map_size is the end of boot RAM, at
                        least 4 GiB: device memory is the kernel's to map, so
                        these tables do not grow with maxmem
kernel's ``p_paddr``    the kernel (must stay clear of everything above)
======================  ====================================================

Registers at entry: long mode with paging (CR3 = the PML4), CS 0x10, DS, ES,
FS, GS, SS 0x18, an empty IDT, RFLAGS = 2 (interrupts off), RIP = ``e_entry``,
RSI = the zero page, RSP = 0x9000, every other general register 0.

The zero page carries the e820 table (RAM only: memory-device areas are not
in it), ``cmd_line_ptr``/``ext_cmd_line_ptr`` and the loader fields a
bootloader fills (boot flag, ``HdrS``, protocol 2.15, loader type 0xff).
Everything is checked before the first byte is written: a bad image or a
layout conflict raises :class:`BootError` and guest memory stays untouched.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvmmem.kvm import x86
from kvmmem.memory.guest_memory import GuestMemory, GuestMemoryError

if TYPE_CHECKING:
    from kvmmem.kvm import Vcpu

__all__ = [
    "BootError", "BootLayout", "BootPlan", "ElfImage", "ElfSegment", "WritePhys",
    "E820_RAM", "E820_RESERVED", "GDT_ADDR", "ZERO_PAGE_ADDR", "STACK_TOP", "CMDLINE_ADDR",
    "CMDLINE_MAX", "parse_elf64", "load_elf64", "build_zero_page", "prepare_boot",
    "set_boot_registers", "boot", "apply_boot", "guest_writer",
]

WritePhys = Callable[[int, bytes], None]
"""Copies bytes to a guest-physical address (raises if it is not RAM)."""

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
FOUR_GIB = 4 * GIB

GDT_ADDR = 0x500
ZERO_PAGE_ADDR = 0x7000
ZERO_PAGE_SIZE = 4096
STACK_TOP = 0x9000
STACK_SIZE = 0x1000
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 4095
"""Longest command line, without its NUL (Linux's x86 limit is 2048)."""
PAGE_TABLE_FLOOR = MIB
"""Page tables are placed in RAM between 1 MiB and 4 GiB."""
MAX_MAP_SIZE = 512 * 512 * GIB
"""What one PML4 of 2 MiB pages maps (256 TiB)."""
LOW_RAM_END = 0x9FC00
"""End of conventional memory on a pc (the EBDA and the BIOS area follow)."""

E820_RAM = 1
E820_RESERVED = 2
E820_MAX_ENTRIES = 128

# struct boot_params (arch/x86/include/uapi/asm/bootparam.h)
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_BOOT_FLAG = 0x1FE
BP_HEADER = 0x202
BP_VERSION = 0x206
BP_TYPE_OF_LOADER = 0x210
BP_LOADFLAGS = 0x211
BP_CMD_LINE_PTR = 0x228
BP_CMDLINE_SIZE = 0x238
BP_E820_TABLE = 0x2D0
E820_ENTRY = struct.Struct("<QQI")

BOOT_FLAG = 0xAA55
HEADER_MAGIC = b"HdrS"
PROTOCOL_VERSION = 0x020F
LOADER_TYPE_UNDEFINED = 0xFF
LOADED_HIGH = 1 << 0

# ELF64 (System V gABI, x86-64 psABI)
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
ELFCLASS64, ELFDATA2LSB, EV_CURRENT = 2, 1, 1
ET_EXEC, EM_X86_64, PT_LOAD = 2, 62, 1


class BootError(ValueError):
    """The kernel image or the boot layout is unusable; nothing was written."""


@dataclass(frozen=True)
class ElfSegment:
    """One PT_LOAD segment: ``data`` goes to ``paddr``, zeros up to ``memsz``."""

    paddr: int
    data: bytes
    memsz: int
    flags: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


@dataclass(frozen=True)
class ElfImage:
    """A parsed kernel: entry point and loadable segments."""

    entry: int
    segments: tuple[ElfSegment, ...]


@dataclass(frozen=True)
class BootLayout:
    """Where the loader put things (all guest-physical addresses)."""

    entry: int
    zero_page: int
    cmdline: int
    gdt: int
    stack_top: int
    page_tables: int
    page_tables_size: int
    map_size: int
    kernel: tuple[tuple[int, int], ...]
    """(start, end) of every kernel segment."""


@dataclass(frozen=True)
class BootPlan:
    """Everything :func:`boot` writes, checked and ready."""

    layout: BootLayout
    writes: tuple[tuple[int, bytes], ...]


# -- ELF ----------------------------------------------------------------------

def _read_image(image: bytes | bytearray | memoryview | str | os.PathLike[str],
                max_size: int | None = None) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        # O_NONBLOCK: a FIFO must not block open(); only a regular file has an
        # end to read to (/dev/zero has none)
        name = os.fspath(image)
        try:
            fd = os.open(image, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise BootError(f"cannot read kernel {name!r}: {exc.strerror}") from None
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BootError(f"cannot read kernel {name!r}: not a regular file")
            # Refused before it is read: an image guest RAM could not hold would
            # only cost the host its memory (QEMU's load_image_targphys() refuses
            # an image larger than the room it is given the same way).
            if max_size is not None and st.st_size > max_size:
                raise BootError(_too_large(name, st.st_size, max_size))
            try:
                data = f.read() if max_size is None else f.read(max_size + 1)
            except OSError as exc:
                raise BootError(f"cannot read kernel {name!r}: {exc.strerror}") from None
            if max_size is not None and len(data) > max_size:     # it grew since fstat
                raise BootError(_too_large(name, len(data), max_size))
            return data
    raise TypeError(f"a kernel is bytes or a path, not {type(image).__name__}")


def _too_large(name: str, size: int, max_size: int) -> str:
    return (f"cannot load kernel {name!r}: it has {size} bytes, more than the {max_size} "
            "bytes of guest RAM could hold")


def parse_elf64(image: bytes | bytearray | memoryview | str | os.PathLike[str],
                max_size: int | None = None) -> ElfImage:
    """Parse and check an ELF64 x86-64 executable (a path or its bytes); a
    file larger than ``max_size`` bytes (the guest RAM) is refused unread."""
    data = _read_image(image, max_size)
    if len(data) < _EHDR.size or data[:4] != b"\x7fELF":
        raise BootError("the kernel is not an ELF file (no \\x7fELF magic)")
    (ident, e_type, machine, _version, entry, phoff, _shoff, _flags, _ehsize,
     phentsize, phnum, _shentsize, _shnum, _shstrndx) = _EHDR.unpack_from(data)
    if ident[4] != ELFCLASS64:
        raise BootError(f"the kernel is not ELF64 (class {ident[4]}); the 64-bit boot "
                        "protocol needs a 64-bit image")
    if ident[5] != ELFDATA2LSB:
        raise BootError("the kernel is not little-endian ELF")
    if machine != EM_X86_64:
        raise BootError(f"the kernel is for ELF machine {machine}, not x86-64 ({EM_X86_64})")
    if e_type != ET_EXEC:
        raise BootError(f"the kernel is ELF type {e_type}, not an executable (ET_EXEC)")
    if phentsize != _PHDR.size or phnum == 0 or phoff + phnum * phentsize > len(data):
        raise BootError("the kernel's program headers are missing or truncated")
    segments = []
    for i in range(phnum):
        p_type, p_flags, offset, _vaddr, paddr, filesz, memsz, _align = \
            _PHDR.unpack_from(data, phoff + i * phentsize)
        if p_type != PT_LOAD or memsz == 0:
            continue
        if filesz > memsz or offset + filesz > len(data):
            raise BootError(f"segment {i} at {paddr:#x}: file size {filesz:#x} exceeds its "
                            "memory size or the file")
        if paddr + memsz > 1 << 52:
            raise BootError(f"segment {i} at {paddr:#x}+{memsz:#x} lies beyond physical memory")
        segments.append(ElfSegment(paddr, data[offset:offset + filesz], memsz, p_flags))
    if not segments:
        raise BootError("the kernel has no PT_LOAD segment")
    segments.sort(key=lambda s: s.paddr)
    for a, b in zip(segments, segments[1:]):
        if b.paddr < a.end:
            raise BootError(f"kernel segments at {a.paddr:#x} and {b.paddr:#x} overlap")
    if not any(s.paddr <= entry < s.end for s in segments):
        raise BootError(f"entry point {entry:#x} is outside every loaded segment "
                        "(the 64-bit entry must be a physical address)")
    return ElfImage(entry, tuple(segments))


def _inside(start: int, end: int, ranges: Iterable[tuple[int, int]]) -> bool:
    return any(base <= start and end <= base + size for base, size in ranges)


def load_elf64(image: bytes | bytearray | memoryview | str | os.PathLike[str] | ElfImage,
               write_phys: WritePhys, ram: Sequence[tuple[int, int]],
               reserved: Sequence[tuple[int, int, str]] = ()) -> int:
    """Copy a kernel's segments to guest RAM and return its entry point.

    ``ram`` lists the (start, size) of guest RAM; every segment must lie
    inside one range. ``reserved`` lists (start, size, what) ranges the
    kernel must not touch (the loader's own structures). Everything is
    checked first: on a BootError nothing has been written.
    """
    elf = image if isinstance(image, ElfImage) else parse_elf64(image)
    for seg in elf.segments:
        if not _inside(seg.paddr, seg.end, ram):
            raise BootError(f"kernel segment {seg.paddr:#x}-{seg.end:#x} is not inside guest RAM")
        for start, size, what in reserved:
            if seg.paddr < start + size and start < seg.end:
                raise BootError(f"kernel segment {seg.paddr:#x}-{seg.end:#x} overlaps the "
                                f"{what} at {start:#x}-{start + size:#x}")
    for seg in elf.segments:
        write_phys(seg.paddr, seg.data + bytes(seg.memsz - len(seg.data)))
    return elf.entry


# -- zero page ----------------------------------------------------------------

def _check_e820(e820: Sequence[tuple[int, int, int]]) -> None:
    if len(e820) > E820_MAX_ENTRIES:
        raise BootError(f"{len(e820)} e820 entries; the zero page holds {E820_MAX_ENTRIES}")
    for entry in e820:
        addr, size, kind = entry
        if not (0 <= addr < 1 << 64 and 0 < size and addr + size <= 1 << 64 and 0 <= kind < 1 << 32):
            raise BootError(f"bad e820 entry {entry!r}: address, size (> 0) and type must fit "
                            "64/64/32 bits")
    ram = sorted((a, s) for a, s, k in e820 if k == E820_RAM)
    for (a, s), (b, _) in zip(ram, ram[1:]):
        if b < a + s:
            raise BootError(f"e820 RAM entries at {a:#x} and {b:#x} overlap")


def build_zero_page(e820: Sequence[tuple[int, int, int]], cmdline_addr: int,
                    cmdline_len: int) -> bytes:
    """``struct boot_params`` (4096 bytes) as a bootloader hands it over.

    ``e820`` is a list of (addr, size, type) entries; ``cmdline_len`` is the
    command line's length without its NUL (stored as ``cmdline_size``).
    """
    _check_e820(e820)
    if not 0 <= cmdline_addr < 1 << 64 or not 0 <= cmdline_len < 1 << 32:
        raise BootError(f"command line at {cmdline_addr:#x} of {cmdline_len} bytes does not fit "
                        "the zero page fields")
    page = bytearray(ZERO_PAGE_SIZE)
    struct.pack_into("<H", page, BP_BOOT_FLAG, BOOT_FLAG)
    page[BP_HEADER:BP_HEADER + 4] = HEADER_MAGIC
    struct.pack_into("<H", page, BP_VERSION, PROTOCOL_VERSION)
    page[BP_TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED
    page[BP_LOADFLAGS] = LOADED_HIGH
    struct.pack_into("<I", page, BP_CMD_LINE_PTR, cmdline_addr & 0xFFFF_FFFF)
    struct.pack_into("<I", page, BP_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    struct.pack_into("<I", page, BP_CMDLINE_SIZE, cmdline_len)
    page[BP_E820_ENTRIES] = len(e820)
    for i, (addr, size, kind) in enumerate(e820):
        E820_ENTRY.pack_into(page, BP_E820_TABLE + i * E820_ENTRY.size, addr, size, kind)
    return bytes(page)


# -- the whole boot -------------------------------------------------------------

def _place_page_tables(ram: Sequence[tuple[int, int]], size: int,
                       busy: Sequence[tuple[int, int]]) -> int:
    """Highest page-aligned spot of ``size`` bytes in RAM in [1 MiB, 4 GiB)
    that avoids every (start, end) in ``busy``."""
    free: list[tuple[int, int]] = []
    for base, length in ram:
        cur, hi = max(base, PAGE_TABLE_FLOOR), min(base + length, FOUR_GIB)
        for start, end in sorted(busy):
            if start >= hi:
                break
            if start > cur:
                free.append((cur, start))
            cur = max(cur, end)
        if cur < hi:
            free.append((cur, hi))
    for lo, hi in sorted(free, reverse=True):
        spot = (hi - size) & ~(x86.PAGE_4K - 1)
        if spot >= lo:
            return spot
    raise BootError(f"no room for {size:#x} bytes of page tables in RAM between 1 MiB and "
                    "4 GiB outside the kernel: give the VM more RAM below 4 GiB")


def prepare_boot(kernel: bytes | str | os.PathLike[str] | ElfImage, cmdline: str | bytes,
                 e820: Sequence[tuple[int, int, int]], map_size: int) -> BootPlan:
    """Check everything and compute what :func:`boot` writes (pure)."""
    elf = kernel if isinstance(kernel, ElfImage) else parse_elf64(kernel)
    # surrogateescape: the bytes of a command line from argv come back as given
    raw = cmdline.encode("utf-8", "surrogateescape") if isinstance(cmdline, str) else bytes(cmdline)
    if len(raw) > CMDLINE_MAX or b"\0" in raw:
        raise BootError(f"the command line must be at most {CMDLINE_MAX} bytes without NULs "
                        f"(got {len(raw)} bytes)")
    _check_e820(e820)
    ram = [(a, s) for a, s, k in e820 if k == E820_RAM]
    ram_end = max((a + s for a, s in ram), default=0)
    if not isinstance(map_size, int) or not max(ram_end, FOUR_GIB) <= map_size <= MAX_MAP_SIZE:
        raise BootError(f"map_size {map_size!r} must cover all RAM (to {ram_end:#x}) and the "
                        f"MMIO window below 4 GiB, and be at most {MAX_MAP_SIZE:#x} (one PML4)")
    gdt = x86.gdt_bytes()
    fixed = [(GDT_ADDR, len(gdt), "GDT"), (ZERO_PAGE_ADDR, ZERO_PAGE_SIZE, "zero page"),
             (STACK_TOP - STACK_SIZE, STACK_SIZE, "boot stack"),
             (CMDLINE_ADDR, CMDLINE_MAX + 1, "command line")]
    for start, size, what in fixed:
        if not _inside(start, start + size, ram):
            raise BootError(f"the {what} at {start:#x}-{start + size:#x} is not in e820 RAM "
                            "(the loader needs RAM from 0 to 0x21000)")
    tables_size = x86.page_table_size(map_size)
    kernel_ranges = [(s.paddr, s.end) for s in elf.segments]
    tables_addr = _place_page_tables(ram, tables_size, kernel_ranges)
    reserved = fixed + [(tables_addr, tables_size, "page tables")]

    writes: list[tuple[int, bytes]] = []
    entry = load_elf64(elf, lambda addr, data: writes.append((addr, data)), ram, reserved)
    writes += [
        (GDT_ADDR, gdt),
        (ZERO_PAGE_ADDR, build_zero_page(e820, CMDLINE_ADDR, len(raw))),
        (CMDLINE_ADDR, raw + b"\0"),
        (tables_addr, x86.identity_page_tables(tables_addr, map_size)),
    ]
    layout = BootLayout(entry, ZERO_PAGE_ADDR, CMDLINE_ADDR, GDT_ADDR, STACK_TOP, tables_addr,
                        tables_size, map_size, tuple(kernel_ranges))
    return BootPlan(layout, tuple(writes))


def set_boot_registers(vcpu: Vcpu, layout: BootLayout) -> None:
    """Put ``vcpu`` at the kernel's 64-bit entry as the protocol says."""
    from kvmmem.kvm import ffi

    sregs: Any = vcpu.get_sregs()
    x86.setup_long_mode(sregs, layout.page_tables, layout.gdt)
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.cr2 = sregs.cr8 = 0
    for i in range(len(sregs.interrupt_bitmap)):
        sregs.interrupt_bitmap[i] = 0
    vcpu.set_sregs(sregs)
    regs: Any = ffi.new("struct kvm_regs *")
    regs.rip, regs.rsi, regs.rsp, regs.rflags = layout.entry, layout.zero_page, layout.stack_top, 2
    vcpu.set_regs(regs)


def boot(vcpu: Vcpu, write_phys: WritePhys, kernel: bytes | str | os.PathLike[str] | ElfImage,
         cmdline: str | bytes, e820: Sequence[tuple[int, int, int]], map_size: int) -> BootLayout:
    """Load ``kernel``, write the loader's structures and set ``vcpu`` up
    for its 64-bit entry; ``map_size`` is the end of the identity map (at
    least the end of RAM and 4 GiB). Returns where things went."""
    return apply_boot(vcpu, write_phys, prepare_boot(kernel, cmdline, e820, map_size))


def apply_boot(vcpu: Vcpu, write_phys: WritePhys, plan: BootPlan) -> BootLayout:
    """Write a checked plan to guest memory and set ``vcpu`` up for its entry."""
    for addr, data in plan.writes:
        write_phys(addr, data)
    set_boot_registers(vcpu, plan.layout)
    return plan.layout


# -- pc helpers -----------------------------------------------------------------


def guest_writer(memory: GuestMemory) -> WritePhys:
    """A ``write_phys`` through the machine's guest-memory access: a range
    that is not (entirely) RAM raises :class:`BootError`."""
    def write_phys(addr: int, data: bytes) -> None:
        try:
            memory.write(addr, data)
        except GuestMemoryError as exc:
            raise BootError(f"guest range {addr:#x}-{addr + len(data):#x} is not (entirely) "
                            f"RAM: {exc}") from exc
    return write_phys
