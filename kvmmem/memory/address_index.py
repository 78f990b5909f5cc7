"""Subregions of one container sorted by address, for O(log n) overlap questions.

The incremental commit (see :mod:`kvmmem.memory.incremental`) must know
whether a subregion being added or removed overlaps any sibling. A
container keeps this index once it has been asked the question, and keeps
it current as subregions come and go or move. It also knows whether all
its subregions are pairwise disjoint, the case in which the sibling just
before a range is the only one that can reach into it; when they are not,
every question is answered "maybe" (the caller then renders everything).
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvmmem.memory.region import MemoryRegion

__all__ = ["AddressIndex"]


class AddressIndex:
    """The subregions of a container sorted by their start address."""

    __slots__ = ("starts", "children", "disjoint")

    def __init__(self, children: list[MemoryRegion]) -> None:
        ordered = sorted(children, key=_addr)
        self.children = ordered
        self.starts = [c.addr for c in ordered]
        self.disjoint = _all_disjoint(ordered)

    def insert(self, child: MemoryRegion) -> None:
        start, end = child.addr, child.addr + child.size
        i = bisect.bisect_right(self.starts, start)
        if self.disjoint:
            before = self.children[i - 1] if i else None
            after = self.children[i] if i < len(self.children) else None
            if (before is not None and before.addr + before.size > start) or \
                    (after is not None and after.addr < end):
                self.disjoint = False
        self.starts.insert(i, start)
        self.children.insert(i, child)

    def remove(self, child: MemoryRegion) -> None:
        starts, children = self.starts, self.children
        i = bisect.bisect_left(starts, child.addr)
        while children[i] is not child:      # equal starts: a short scan
            i += 1
        del starts[i], children[i]

    def overlaps(self, lo: int, hi: int, exclude: MemoryRegion | None) -> bool:
        """Whether a subregion other than ``exclude`` may reach into [lo, hi).

        Exact when the subregions are disjoint; otherwise always True.
        """
        if not self.disjoint:
            return True
        children = self.children
        i = bisect.bisect_left(self.starts, hi)
        # Disjoint subregions have ascending ends too: only the last one or
        # two starting below ``hi`` (one may be ``exclude``) can reach ``lo``.
        for k in (i - 1, i - 2):
            if k < 0:
                return False
            other = children[k]
            if other is not exclude:
                return other.addr + other.size > lo
        return False


def _addr(mr: MemoryRegion) -> int:
    return mr.addr


def _all_disjoint(ordered: list[MemoryRegion]) -> bool:
    reach = -1
    for mr in ordered:
        if mr.addr < reach:
            return False
        reach = max(reach, mr.addr + mr.size)
    return True
