"""x86-64 boot state: a flat GDT, identity page tables with 2 MiB pages and
the control registers that put a fresh vCPU straight into long mode.

Pure byte builders plus one function that fills ``kvm_sregs``; the GDT
follows Linux's boot protocol (``__BOOT_CS`` 0x10, ``__BOOT_DS`` 0x18), so a
guest set up here could be a ``vmlinux`` entered at its 64-bit entry point.
"""

from __future__ import annotations

import struct
from typing import Any

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_AM = 1 << 18
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

BOOT_CS = 0x10
BOOT_DS = 0x18

PAGE_PRESENT = 1 << 0
PAGE_WRITE = 1 << 1
PAGE_PS = 1 << 7

PAGE_4K = 4096
PAGE_2M = 2 << 20
PAGE_1G = 1 << 30

GDT_ENTRIES = (
    0,                      # null
    0,                      # unused, as in Linux's boot GDT
    0x00AF9B000000FFFF,     # 0x10: 64-bit code, present, DPL 0
    0x00CF93000000FFFF,     # 0x18: flat 4 GiB data, writable
)


def gdt_bytes() -> bytes:
    """The boot GDT, ready to copy into guest memory."""
    return struct.pack(f"<{len(GDT_ENTRIES)}Q", *GDT_ENTRIES)


def page_table_size(map_size: int) -> int:
    """Bytes of page tables :func:`identity_page_tables` needs for
    ``map_size`` bytes: PML4, PDPTs and one page directory per GiB."""
    gib = -(-map_size // PAGE_1G)
    pdpts = -(-gib // 512)
    return PAGE_4K * (1 + pdpts + gib)


def identity_page_tables(base: int, map_size: int) -> bytes:
    """Page tables that map guest-physical [0, map_size) 1:1 with 2 MiB pages.

    The PML4 is the first page (load its address, ``base``, into CR3), then
    the PDPTs, then the page directories; all tables live at ``base``.
    """
    if base % PAGE_4K:
        raise ValueError(f"page tables must be page-aligned, not at {base:#x}")
    if map_size <= 0 or map_size > 512 * 512 * PAGE_1G:
        raise ValueError(f"cannot identity-map {map_size:#x} bytes with one PML4")
    gib = -(-map_size // PAGE_1G)
    pdpts = -(-gib // 512)
    pml4 = [0] * 512
    for i in range(pdpts):
        pml4[i] = (base + PAGE_4K * (1 + i)) | PAGE_PRESENT | PAGE_WRITE
    pdpt = [0] * (512 * pdpts)
    pd_base = base + PAGE_4K * (1 + pdpts)
    for g in range(gib):
        pdpt[g] = (pd_base + PAGE_4K * g) | PAGE_PRESENT | PAGE_WRITE
    flags = PAGE_PRESENT | PAGE_WRITE | PAGE_PS
    pd = [(i * PAGE_2M) | flags for i in range(512 * gib)]
    return struct.pack(f"<{512 + len(pdpt) + len(pd)}Q", *pml4, *pdpt, *pd)


def _segment(seg: Any, selector: int, code: bool) -> None:
    seg.base, seg.limit, seg.selector = 0, 0xFFFFFFFF, selector
    seg.present, seg.dpl, seg.s, seg.g, seg.avl, seg.unusable = 1, 0, 1, 1, 0, 0
    if code:
        seg.type, seg.l, seg.db = 0xB, 1, 0    # execute/read, accessed; 64-bit
    else:
        seg.type, seg.l, seg.db = 0x3, 0, 1    # read/write, accessed


def setup_long_mode(sregs: Any, pml4_addr: int, gdt_addr: int) -> None:
    """Fill ``kvm_sregs`` for 64-bit mode with paging on, flat segments from
    the boot GDT at ``gdt_addr`` and the page tables at ``pml4_addr``."""
    _segment(sregs.cs, BOOT_CS, code=True)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _segment(seg, BOOT_DS, code=False)
    sregs.gdt.base, sregs.gdt.limit = gdt_addr, len(GDT_ENTRIES) * 8 - 1
    sregs.cr3 = pml4_addr
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG
    sregs.efer = EFER_LME | EFER_LMA | EFER_SCE
