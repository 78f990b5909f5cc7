"""The incremental commit: update a flat view in place of rendering it again.

Rendering a whole address space, simplifying and diffing it costs time in
proportion to its ranges (with 1000 memslots, several times the ioctl the
commit is for: the README's measurements). Yet the usual mutation, a virtio-mem
memslot alias added to or removed from its container, changes one window
of the view and nothing else.

A commit whose mutations are all subregion additions and removals is done
here when each one can be vouched for: every region from the mutated
container up to the address space root is an enabled, unaliased pure
container, the subregion fits inside each of them, and no sibling at any
level reaches into its span. Then the span's new contents are the
subregion's own rendering (or nothing, for a removal), spliced into the old
view. Anything else returns None and the caller renders everything, so the
result is always the view a full rendering would give (the property tests
compare the two).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvmmem.memory.flatview import FlatRange, FlatView, render_placed, splice
from kvmmem.memory.region import ADDR_SPACE_END, Change, MemoryRegion, RegionKind

__all__ = ["Placement", "place", "update_view"]

_CONTAINER = RegionKind.CONTAINER

# Where a change shows: per level from the mutated container up to the top
# of its tree, (region, window start in it, readonly and unmergeable as
# inherited from there); the window is [start, start + child size) at every
# level.
Placement = list[tuple[MemoryRegion, int, bool, bool]]


def place(change: Change) -> Placement | None:
    """Follow one change up its tree, or None when it cannot be vouched for."""
    mr, below, lo, _ = change
    size = below.size
    ro = unm = False
    levels: Placement = []
    while True:
        if mr.kind is not _CONTAINER or not mr.enabled or mr._aliased_by or lo + size > mr.size \
                or (mr._aindex or mr.address_index()).overlaps(lo, lo + size, below):
            return None
        # Rendered from a root at this level, the child inherits the flags of
        # every container from here down.
        ro, unm = ro or mr.readonly, unm or mr.unmergeable
        levels.append((mr, lo, ro, unm))
        parent = mr.parent
        if parent is None:
            return levels
        lo += mr.addr
        below, mr = mr, parent


def update_view(root: MemoryRegion, view: FlatView, changes: Sequence[tuple[Change, Placement]]
                ) -> tuple[FlatView, list[FlatRange], list[FlatRange]] | None:
    """The view of ``root`` after ``changes``, with (removed, added) ranges;
    None when the changes cannot be spliced (overlapping windows, merges)."""
    windows: list[tuple[int, int, list[FlatRange]]] = []
    for (_, child, _, added), levels in changes:
        for mr, lo, ro, unm in levels:  # noqa: B007 - the level found is used after the loop
            if mr is root:
                base = root.addr + lo
                break
        else:
            continue                 # this space does not see the change
        if not child.size:
            continue
        if base + child.size > ADDR_SPACE_END:
            return None
        new = render_placed(child, base, ro, unm) if added else []
        windows.append((base, base + child.size, new))
    if not windows:
        return view, [], []
    if len(windows) > 1:
        windows.sort(key=_window_start)
        for (_, prev_hi, _), (lo, _, _) in zip(windows, windows[1:]):
            if lo < prev_hi:
                return None
    return splice(view, windows)


def _window_start(window: tuple[int, int, list[FlatRange]]) -> int:
    return window[0]
