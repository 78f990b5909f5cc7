"""Memory regions: the nodes of the guest memory tree.

A region is a container (groups subregions), RAM (a range of a
:class:`~kvmmem.memory.host.HostMemory`), an alias (a window onto part of
another region) or I/O (read/write callbacks, i.e. MMIO).  Subregions sit at
an offset inside their parent with a priority; where siblings overlap the
higher priority wins, and at equal priority the one added later wins (the
order QEMU's implementation gives; its documentation leaves it open).

Every change goes through the global memory transaction (see
:mod:`kvmmem.memory.transaction`): it is journalled so a failed commit can
undo it, and it invalidates the cached rendering of the region and of every
region above it.
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from kvmmem.memory.address_index import AddressIndex
from kvmmem.memory.host import HostMemory
from kvmmem.memory.transaction import TRANSACTION

if TYPE_CHECKING:
    from kvmmem.memory.flatview import FlatRange

__all__ = ["MemoryRegion", "RegionKind", "ReadFn", "WriteFn", "ADDR_SPACE_END"]

ADDR_SPACE_END = 1 << 64       # a region may span the whole 64-bit space

ReadFn = Callable[[int, int], int]           # (offset, size) -> value
WriteFn = Callable[[int, int, int], None]    # (offset, size, value)


class RegionKind(enum.Enum):
    CONTAINER = "container"
    RAM = "ram"
    ALIAS = "alias"
    IO = "io"


# What a journalled mutation was, when it is one the incremental commit
# handles: (container, child, child's offset, True for added / False for
# removed). Other mutations are journalled with None.
Change = tuple["MemoryRegion", "MemoryRegion", int, bool]


class MemoryRegion:
    """One node of the region tree; build it with the classmethods.

    ``parent`` is the container the region was added to (None for roots and
    for regions only reached through aliases), ``addr`` its offset there.
    """

    __slots__ = ("name", "size", "kind", "priority", "addr", "parent", "enabled",
                 "readonly", "unmergeable", "host", "host_offset", "target",
                 "alias_offset", "read_fn", "write_fn",
                 "_children", "_aliased_by", "_rcache", "_aindex", "__weakref__")

    def __init__(self, kind: RegionKind, name: str, size: int) -> None:
        if not isinstance(name, str):
            raise TypeError(f"region name must be a str, not {type(name).__name__}")
        _check_int("size", size)
        if not 0 <= size <= ADDR_SPACE_END:
            raise ValueError(f"region {name!r}: size {size:#x} is outside [0, 2**64]")
        self.name = name
        self.size = size
        self.kind = kind
        self.priority = 0
        self.addr = 0
        self.parent: MemoryRegion | None = None
        self.enabled = True
        self.readonly = False
        self.unmergeable = False
        self.host: HostMemory | None = None
        self.host_offset = 0
        self.target: MemoryRegion | None = None
        self.alias_offset = 0
        self.read_fn: ReadFn | None = None
        self.write_fn: WriteFn | None = None
        # Subregions in rendering order: priority descending, later-added first.
        self._children: list[MemoryRegion] = []
        # Weak references to the aliases targeting this region; a dying alias
        # removes its own (a list, not a WeakSet: testing it is on the path
        # of every mutation).
        self._aliased_by: list[weakref.ref[MemoryRegion]] = []
        # (render key, rendered ranges) of the last rendering; see flatview.py.
        self._rcache: tuple[tuple[object, ...], list[FlatRange]] | None = None
        # Subregions by address, built when first asked for (address_index.py).
        self._aindex: AddressIndex | None = None

    # -- constructors ---------------------------------------------------------

    @classmethod
    def container(cls, name: str, size: int) -> MemoryRegion:
        """A pure container: transparent wherever no subregion maps something."""
        return cls(RegionKind.CONTAINER, name, size)

    @classmethod
    def ram(cls, name: str, host: HostMemory, offset: int = 0, size: int | None = None,
            *, readonly: bool = False) -> MemoryRegion:
        """Guest RAM backed by ``host[offset:offset+size]`` (all of it by default)."""
        if not isinstance(host, HostMemory):
            raise TypeError(f"RAM region {name!r} needs a HostMemory, not {type(host).__name__}")
        if size is None:
            size = host.size - offset
        _check_int("offset", offset)
        _check_int("size", size)
        if offset < 0 or size < 0 or offset + size > host.size:
            raise ValueError(f"RAM region {name!r}: [{offset:#x}, +{size:#x}) lies outside "
                             f"host memory {host.name!r} of size {host.size:#x}")
        mr = cls(RegionKind.RAM, name, size)
        mr.host, mr.host_offset, mr.readonly = host, offset, bool(readonly)
        return mr

    @classmethod
    def alias(cls, name: str, target: MemoryRegion, offset: int, size: int, *,
              unmergeable: bool = False) -> MemoryRegion:
        """A window of ``size`` bytes onto ``target`` starting at ``offset`` in it."""
        if not isinstance(target, MemoryRegion):
            raise TypeError(f"alias {name!r} needs a MemoryRegion target, "
                            f"not {type(target).__name__}")
        _check_int("offset", offset)
        _check_int("size", size)
        if offset < 0 or size < 0 or offset + size > target.size:
            raise ValueError(f"alias {name!r}: [{offset:#x}, +{size:#x}) lies outside "
                             f"its target {target.name!r} of size {target.size:#x}")
        mr = cls(RegionKind.ALIAS, name, size)
        mr.target, mr.alias_offset, mr.unmergeable = target, offset, bool(unmergeable)
        target._aliased_by.append(weakref.ref(mr, target._aliased_by.remove))
        return mr

    @classmethod
    def io(cls, name: str, size: int, read: ReadFn | None = None,
           write: WriteFn | None = None) -> MemoryRegion:
        """An I/O (MMIO) region; without callbacks it only reserves the range."""
        for label, fn in (("read", read), ("write", write)):
            if fn is not None and not callable(fn):
                raise TypeError(f"I/O region {name!r}: {label} callback is not callable")
        mr = cls(RegionKind.IO, name, size)
        mr.read_fn, mr.write_fn = read, write
        return mr

    # -- queries ----------------------------------------------------------------

    @property
    def subregions(self) -> tuple[MemoryRegion, ...]:
        """Direct subregions in rendering order (priority descending)."""
        return tuple(self._children)

    @property
    def is_terminal(self) -> bool:
        """RAM and I/O regions end a lookup; containers and aliases pass it on."""
        return self.kind is RegionKind.RAM or self.kind is RegionKind.IO

    def address_index(self) -> AddressIndex:
        """The subregions sorted by address (kept current once built)."""
        index = self._aindex
        if index is None:
            index = self._aindex = AddressIndex(self._children)
        return index

    def host_address(self, offset: int = 0) -> int:
        """Host virtual address of byte ``offset`` of a RAM region."""
        if self.host is None:
            raise TypeError(f"region {self.name!r} is {self.kind.value}, not RAM")
        return self.host.address + self.host_offset + offset

    def dispatch_read(self, offset: int, size: int) -> int:
        """Run the read callback (0 when there is none, as QEMU's unassigned reads)."""
        return self.read_fn(offset, size) if self.read_fn is not None else 0

    def dispatch_write(self, offset: int, size: int, value: int) -> None:
        """Run the write callback; without one the write is dropped."""
        if self.write_fn is not None:
            self.write_fn(offset, size, value)

    def __repr__(self) -> str:
        return f"<MemoryRegion {self.kind.value} {self.name!r} size={self.size:#x}>"

    # -- mutations (journalled) ---------------------------------------------------

    def add_subregion(self, offset: int, child: MemoryRegion, priority: int = 0) -> None:
        """Map ``child`` at ``offset`` inside this region."""
        if self.kind is RegionKind.ALIAS:
            raise TypeError(f"cannot add subregions to alias {self.name!r}")
        if not isinstance(child, MemoryRegion):
            raise TypeError(f"subregion must be a MemoryRegion, not {type(child).__name__}")
        if type(offset) is not int or type(priority) is not int:    # exact ints pass at once
            _check_int("offset", offset)
            _check_int("priority", priority)
        if child.parent is not None:
            raise ValueError(f"region {child.name!r} is already mapped in "
                             f"{child.parent.name!r}; remove it there first")
        if offset < 0 or offset + child.size > ADDR_SPACE_END:
            raise ValueError(f"subregion {child.name!r} at {offset:#x} does not fit "
                             f"in a 64-bit address space")
        if self._reachable_from(child):
            raise ValueError(f"adding {child.name!r} to {self.name!r} would make a cycle")
        self._mutate(partial(self._link, child, offset, priority, None),
                     partial(self._unlink, child), (self, child, offset, True))

    def del_subregion(self, child: MemoryRegion) -> None:
        """Unmap ``child`` from this region."""
        if not isinstance(child, MemoryRegion) or child.parent is not self:
            name = getattr(child, "name", child)
            raise ValueError(f"{name!r} is not a subregion of {self.name!r}")
        index = self._children.index(child)
        self._mutate(partial(self._unlink, child),
                     partial(self._link, child, child.addr, child.priority, index),
                     (self, child, child.addr, False))

    def set_enabled(self, enabled: bool) -> None:
        """Show or hide the region (and everything below it) without unmapping it."""
        self._set("enabled", bool(enabled))

    def set_address(self, offset: int) -> None:
        """Move the region to another offset in its container."""
        _check_int("offset", offset)
        if offset < 0 or offset + self.size > ADDR_SPACE_END:
            raise ValueError(f"region {self.name!r} at {offset:#x} does not fit "
                             f"in a 64-bit address space")
        self._set("addr", offset)

    def set_readonly(self, readonly: bool) -> None:
        """Make guest writes to this region (and below) fault/exit instead of storing."""
        self._set("readonly", bool(readonly))

    def set_unmergeable(self, unmergeable: bool) -> None:
        """Keep flat ranges from this region (and below) apart from their neighbours,
        so each stays its own memslot."""
        self._set("unmergeable", bool(unmergeable))

    # -- internals ----------------------------------------------------------------

    def _set(self, attr: str, value: object) -> None:
        old = getattr(self, attr)
        if old == value:
            return

        def apply(v: object) -> Callable[[], None]:
            def run() -> None:
                setattr(self, attr, v)
                if attr == "addr" and self.parent is not None:
                    self.parent._aindex = None      # rebuilt when next asked for
                self._invalidate()
            return run

        self._mutate(apply(value), apply(old))

    def _mutate(self, do: Callable[[], None], undo: Callable[[], None],
                change: Change | None = None) -> None:
        journal = TRANSACTION
        journal.begin()
        try:
            do()
            journal.record(undo, change)
        finally:
            journal.commit()       # the outermost commit updates views and listeners

    def _link(self, child: MemoryRegion, addr: int, priority: int, index: int | None) -> None:
        children = self._children
        if index is None:
            index = 0
            if children and priority < children[0].priority:
                index = len(children)
                for i, other in enumerate(children):
                    if priority >= other.priority:
                        index = i
                        break
        child.parent, child.addr, child.priority = self, addr, priority
        children.insert(index, child)
        if self._aindex is not None:
            self._aindex.insert(child)
        # The child keeps its cached rendering: the cache key holds its
        # position, and it was dropped if anything below the child changed.
        self._invalidate()

    def _unlink(self, child: MemoryRegion) -> None:
        self._children.remove(child)
        if self._aindex is not None:
            self._aindex.remove(child)
        child.parent = None
        self._invalidate()

    def _invalidate(self, seen: set[int] | None = None) -> None:
        """Drop the cached rendering of this region and of everything above it:
        its parents and the aliases showing it (each alias once)."""
        mr: MemoryRegion | None = self
        while mr is not None:
            mr._rcache = None
            if mr._aliased_by:
                seen = set() if seen is None else seen
                for ref in list(mr._aliased_by):
                    alias = ref()
                    if alias is not None and id(alias) not in seen:
                        seen.add(id(alias))
                        alias._invalidate(seen)
            mr = mr.parent

    def _reachable_from(self, start: MemoryRegion) -> bool:
        """Whether this region is ``start`` or lies below it (through aliases too)."""
        # Walk down from start (subregions and alias targets): adding a leaf,
        # the usual case, costs a step or two whatever the depth of the tree.
        target = start.target
        if not start._children and (target is None or (not target._children
                                                        and target.target is None)):
            return self is start or self is target        # a leaf, or an alias of one
        stack, seen = [start], set()
        while stack:
            mr = stack.pop()
            if mr is self:
                return True
            if id(mr) in seen:
                continue
            seen.add(id(mr))
            stack.extend(mr._children)
            if mr.target is not None:
                stack.append(mr.target)
        return False


def _check_int(label: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{label} must be an int, not {type(value).__name__}")
