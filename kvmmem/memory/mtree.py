"""``info mtree``: the region tree and the flat views in QEMU's HMP format.

The text matches QEMU's monitor output byte for byte (``mtree_info`` in
QEMU's system/memory.c) as QEMU 7 and 8 print it (containers as ``i/o``;
QEMU 9 prints regions
without a parent as ``container``), so listings compare with QEMU's directly.
"""

from __future__ import annotations

from collections.abc import Iterable

from kvmmem.memory.address_space import AddressSpace, address_spaces
from kvmmem.memory.region import MemoryRegion, RegionKind

__all__ = ["mtree_info", "region_type"]

_INDENT = "  "
_MASK64 = (1 << 64) - 1


def region_type(mr: MemoryRegion) -> str:
    """QEMU's type label: an alias has its target's type; RAM is ram/rom; else i/o."""
    while mr.kind is RegionKind.ALIAS:
        assert mr.target is not None
        mr = mr.target
    if mr.kind is RegionKind.RAM:
        return "rom" if mr.readonly else "ram"
    return "i/o"


def mtree_info(flatview: bool = False, *, spaces: Iterable[AddressSpace] | None = None,
               disabled: bool = False) -> str:
    """The text of ``info mtree`` (``flatview=True``: ``info mtree -f``).

    ``spaces`` defaults to every live address space.  ``disabled`` also lists
    disabled regions (marked ``[disabled]``), like ``info mtree -D``.
    """
    groups = _group_by_root(address_spaces() if spaces is None else list(spaces))
    out: list[str] = []
    if flatview:
        for number, group in enumerate(groups):
            _print_flatview(out, number, group)
    else:
        _print_trees(out, groups, disabled)
    return "".join(out)


def _group_by_root(spaces: list[AddressSpace]) -> list[list[AddressSpace]]:
    """Address spaces sharing a root share a tree and a flat view, as in QEMU."""
    groups: dict[int, list[AddressSpace]] = {}
    for space in spaces:
        groups.setdefault(id(space.root), []).append(space)
    return list(groups.values())


def _print_trees(out: list[str], groups: list[list[AddressSpace]], disabled: bool) -> None:
    alias_queue: list[MemoryRegion] = []
    for group in groups:
        for space in sorted(group, key=lambda s: s.name):
            out.append(f"address-space: {space.name}\n")
        _print_region(out, group[0].root, 1, 0, alias_queue, disabled)
        out.append("\n")
    # The queue grows while it is printed: aliases inside aliased targets.
    i = 0
    while i < len(alias_queue):
        mr = alias_queue[i]
        out.append(f"memory-region: {mr.name}\n")
        _print_region(out, mr, 1, 0, alias_queue, disabled)
        out.append("\n")
        i += 1


def _print_region(out: list[str], mr: MemoryRegion, level: int, base: int,
                  alias_queue: list[MemoryRegion], disabled: bool) -> None:
    start = base + mr.addr
    end = start + (mr.size - 1 if mr.size else 0)
    prefix = ""
    if end > _MASK64:
        prefix, start, end = "[DETECTED OVERFLOW!] ", start & _MASK64, end & _MASK64
    suffix = "" if mr.enabled else " [disabled]"
    if mr.kind is RegionKind.ALIAS:
        target = mr.target
        assert target is not None
        if not any(queued is target for queued in alias_queue):
            alias_queue.append(target)
        if mr.enabled or disabled:
            out.append(f"{prefix}{_INDENT * level}{start:016x}-{end:016x} "
                       f"(prio {mr.priority}, {region_type(mr)}): alias {mr.name} "
                       f"@{target.name} {mr.alias_offset:016x}-"
                       f"{mr.alias_offset + (mr.size - 1 if mr.size else 0):016x}{suffix}\n")
    elif mr.enabled or disabled:
        out.append(f"{prefix}{_INDENT * level}{start:016x}-{end:016x} "
                   f"(prio {mr.priority}, {region_type(mr)}): {mr.name}{suffix}\n")
    # By address, then higher priority first; ties keep rendering order.
    children = sorted(mr._children, key=lambda c: (c.addr, -c.priority))
    for child in children:
        _print_region(out, child, level + 1, start, alias_queue, disabled)


def _print_flatview(out: list[str], number: int, group: list[AddressSpace]) -> None:
    out.append(f"FlatView #{number}\n")
    for space in group:
        line = f' AS "{space.name}", root: {space.root.name}'
        if space.root.kind is RegionKind.ALIAS and space.root.target is not None:
            line += f", alias {space.root.target.name}"
        out.append(line + "\n")
    view = group[0].flatview
    out.append(f" Root memory region: {group[0].root.name}\n")
    if not len(view):
        out.append(f"{_INDENT}No rendered FlatView\n\n")
        return
    accels = [(space, listener) for space in group for listener in space.listeners
              if getattr(listener, "accel_name", None)]
    for fr in view:
        end = fr.start + fr.size - 1
        kind = "rom" if fr.readonly else region_type(fr.region)
        line = (f"{_INDENT}{fr.start:016x}-{end:016x} (prio {fr.region.priority}, {kind}): "
                f"{fr.region.name}")
        if fr.offset:
            line += f" @{fr.offset:016x}"
        for space, listener in accels:
            if listener.has_memory(space, fr.start, fr.size):  # type: ignore[attr-defined]
                line += f" {listener.accel_name}"  # type: ignore[attr-defined]
        out.append(line + "\n")
    out.append("\n")
