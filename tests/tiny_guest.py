"""Tiny guests for the VMM tests: a few hand-assembled x86-64 instructions
in an ELF64 executable that kvmmem's boot contract accepts (one PT_LOAD
segment at 1 MiB, entry at its start, long mode with the identity map).

The test guest of ``tests/guest`` follows virtio-mem; these do one thing
each, such as executing from the MMIO window or reporting how often they
were booted.
"""

from __future__ import annotations

import struct

LOAD_ADDR = 0x100000
BOOT_COUNTER = 0x30000
"""A RAM byte outside everything the loader writes: it survives a reset
(RAM is not cleared), so a guest can tell its first boot from the next."""
DEBUG_EXIT_PORT = 0xF4
SERIAL_PORT = 0x3F8


def elf(code: bytes, paddr: int = LOAD_ADDR) -> bytes:
    """An ELF64 x86-64 executable whose one segment holds ``code`` at ``paddr``."""
    ident = b"\x7fELF\x02\x01\x01" + bytes(9)
    header = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, 62, 1, paddr, 64, 0, 0, 64, 56, 1,
                         0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 7, 120, paddr, paddr, len(code), len(code), 0)
    return header + phdr + code


def say(text: bytes) -> bytes:
    """``out`` each byte of ``text`` to the UART's THR."""
    code = b"\x66\xba" + struct.pack("<H", SERIAL_PORT)           # mov dx, 0x3f8
    for byte in text:
        code += b"\xb0" + bytes([byte]) + b"\xee"                 # mov al, b; out dx, al
    return code


def exit_with(value: int) -> bytes:
    """isa-debug-exit: the VMM stops with status ``(value << 1) | 1``."""
    return b"\xb0" + bytes([value]) + b"\xe6" + bytes([DEBUG_EXIT_PORT])   # mov al; out 0xf4


def jump_to(address: int) -> bytes:
    """Execute from ``address`` (below 4 GiB)."""
    return b"\xb8" + struct.pack("<I", address) + b"\xff\xe0"     # mov eax, a; jmp rax


HANG = b"\xeb\xfe"                                                # jmp $


def first_boot_then(first: bytes, later: bytes) -> bytes:
    """Count boots in RAM at BOOT_COUNTER; run ``first`` on the first boot,
    ``later`` on every other one."""
    count = (b"\xb8" + struct.pack("<I", BOOT_COUNTER)            # mov eax, counter
             + b"\xfe\x00"                                        # inc byte [rax]
             + b"\x80\x38\x01")                                   # cmp byte [rax], 1
    assert len(first) < 128
    return count + b"\x75" + bytes([len(first)]) + first + later   # jne later


def flood(source: int = LOAD_ADDR, count: int = 4096) -> bytes:
    """Write the ``count`` bytes at ``source`` to the UART, again and again
    (``rep outsb``: one exit per page)."""
    return (b"\x66\xba" + struct.pack("<H", SERIAL_PORT)          # mov dx, 0x3f8
            + b"\xbe" + struct.pack("<I", source)                 # 1: mov esi, source
            + b"\xb9" + struct.pack("<I", count)                  # mov ecx, count
            + b"\xf3\x6e\xeb\xf2")                               # rep outsb; jmp 1


def load_cr3(tables: int) -> bytes:
    """Switch to page tables the test wrote at ``tables`` (below 4 GiB): the
    loader's identity map covers boot RAM only, not device memory."""
    return b"\xb8" + struct.pack("<I", tables) + b"\x0f\x22\xd8"   # mov eax, t; mov cr3, rax


def read_forever(pointer: int) -> bytes:
    """Read, again and again, the 8 bytes at the address stored at ``pointer``
    (the test writes it to guest RAM before the guest runs)."""
    return (b"\xb8" + struct.pack("<I", pointer)                  # mov eax, pointer
            + b"\x48\x8b\x00"                                     # mov rax, [rax]
            + b"\x48\x8b\x18\xeb\xfb")                            # 1: mov rbx, [rax]; jmp 1
