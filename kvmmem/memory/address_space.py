"""Address spaces, the global memory transaction, and the listener protocol.

An :class:`AddressSpace` is a root region seen as a guest-physical map: it
holds the current :class:`FlatView` and tells its listeners (KVM, later
vhost) what changed.  Like QEMU there is one transaction depth for all
address spaces: region mutations inside ``with memory_transaction():`` (or
between :func:`begin` and :func:`commit`) are applied to the tree at once
but reach the flat views and the listeners only when the outermost
transaction commits, as one update per address space.

A commit is all-or-nothing.  Every tree mutation is journalled with its
undo; when a listener raises (KVM refusing a memslot), or computing a new
view does, the listener calls
already made are undone in reverse (each add becomes a delete and each
delete an add), the journal is replayed backwards so the tree is as it was
before the outermost ``begin``, the old flat views stay, and the original
exception propagates.  An exception escaping a ``with memory_transaction()``
body likewise reverts the mutations made inside that block.

Most commits add or remove a few subregions that overlap nothing; those
splice the old view where the change shows (:mod:`kvmmem.memory.incremental`)
instead of rendering the address space again, so their cost does not grow
with the number of ranges.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from types import TracebackType
from typing import Callable

from kvmmem.memory import region as _region
from kvmmem.memory.flatview import FlatRange, FlatView, diff, render, simplify
from kvmmem.memory.incremental import Placement, place, update_view
from kvmmem.memory.region import Change, MemoryRegion, RegionKind

__all__ = ["AddressSpace", "MemoryListener", "MemoryRollbackError", "UnassignedAccessError",
           "begin", "commit", "memory_transaction", "transaction_depth", "address_spaces"]


class MemoryRollbackError(RuntimeError):
    """Undoing a failed commit failed too: the listeners may not match the views."""


class UnassignedAccessError(LookupError):
    """A guest access hit an address no region maps."""


class MemoryListener:
    """Base class of the objects told about flat view changes.

    Per commit that changed its address space a listener sees ``begin()``,
    then ``region_del`` for each range that went away (descending address),
    then ``region_add`` for each new range (ascending), then ``commit()``.
    Unchanged ranges produce no call.  A listener serves one address space.
    """

    address_space: AddressSpace | None = None

    def begin(self) -> None:
        """An update starts."""

    def region_add(self, fr: FlatRange) -> None:
        """``fr`` appeared; raise to refuse it (the commit then rolls back)."""

    def region_del(self, fr: FlatRange) -> None:
        """``fr`` went away."""

    def commit(self) -> None:
        """The update is complete."""


class _Transaction:
    """The global transaction: depth, undo journal, live address spaces."""

    def __init__(self) -> None:
        self.depth = 0
        self.journal: list[Callable[[], None]] = []
        # Beside each journal entry, the mutation if it is a subregion added
        # or removed (what the incremental commit can do), else None.
        self.changes: list[Change | None] = []
        self.replaying = False
        self.updating = False           # listeners are being called
        # Weak references by space id, in creation order; a space that dies
        # removes its entry (a plain dict: cheaper to walk on every commit
        # than a WeakValueDictionary).
        self.spaces: dict[int, weakref.ref[AddressSpace]] = {}

    def live_spaces(self) -> list[AddressSpace]:
        return [space for ref in list(self.spaces.values()) if (space := ref()) is not None]

    def track(self, space: AddressSpace) -> None:
        spaces, key = self.spaces, space._id
        spaces[key] = weakref.ref(space, lambda _: spaces.pop(key, None))

    def begin(self) -> None:
        if self.updating:
            raise RuntimeError("memory regions must not change while listeners are called")
        self.depth += 1

    def record(self, undo: Callable[[], None], change: Change | None = None) -> None:
        if not self.replaying:
            self.journal.append(undo)
            self.changes.append(change)

    def commit(self) -> None:
        if self.depth <= 0:
            raise RuntimeError("memory transaction commit without begin")
        self.depth -= 1
        if self.depth == 0 and self.journal:
            try:
                self._update_all()
            finally:
                self.journal.clear()
                self.changes.clear()

    def revert_to(self, mark: int) -> None:
        """Undo the mutations journalled after position ``mark``."""
        self.replaying = True
        try:
            while len(self.journal) > mark:
                self.changes.pop()
                self.journal.pop()()
        finally:
            self.replaying = False

    def _placements(self) -> list[tuple[Change, Placement]] | None:
        """Where each change of this commit shows, or None if one cannot be
        vouched for (then every address space is rendered again)."""
        out = []
        for change in self.changes:
            placement = place(change) if change is not None else None
            if placement is None or self._is_root(change[1]):   # type: ignore[index]
                return None          # a root moved: its whole space shifts
            out.append((change, placement))
        return out

    def _is_root(self, region: MemoryRegion) -> bool:
        for ref in self.spaces.values():
            space = ref()
            if space is not None and space.root is region:
                return True
        return False

    def _update_all(self) -> None:
        updates = []
        log = _CallLog()
        try:
            placements = self._placements()
            for ref in list(self.spaces.values()):
                space = ref()
                if space is None:
                    continue
                update = space._prepare(placements)
                if update is not None:
                    updates.append((space, update))
            self.updating = True
            for space, (_, _, removed, added) in updates:
                for listener in space.listeners:
                    log.notify(listener, removed, added)
        except BaseException:
            self._rollback(log)
            raise
        finally:
            self.updating = False
        for space, (rendered, view, _, _) in updates:
            space._view, space._rendered = view, rendered

    def _rollback(self, log: _CallLog) -> None:
        """Undo applied listener calls and tree mutations after a failed update."""
        errors = log.undo()
        self.updating = False
        self.revert_to(0)
        for space in self.live_spaces():
            space._rendered = None          # next commit compares against the old view
        if errors:
            raise MemoryRollbackError(f"undoing a failed memory commit failed: {errors[0]}"
                                      ) from errors[0]


class _CallLog(list[tuple[MemoryListener, list[bool], list[tuple[bool, FlatRange]]]]):
    """The listener calls one update has made, so that they can be undone: per
    bracket, in call order, (listener, [bracket still open?], calls made)."""

    def notify(self, listener: MemoryListener, removed: list[FlatRange],
               added: list[FlatRange]) -> None:
        """One bracket: begin, deletions (descending), additions, commit."""
        listener.begin()
        state = [True]
        calls: list[tuple[bool, FlatRange]] = []
        self.append((listener, state, calls))
        for fr in reversed(removed):
            listener.region_del(fr)
            calls.append((False, fr))
        for fr in added:
            listener.region_add(fr)
            calls.append((True, fr))
        listener.commit()
        state[0] = False

    def undo(self) -> list[Exception]:
        """Reverse every logged call, latest first; returns the errors met."""
        errors: list[Exception] = []
        for listener, state, calls in reversed(self):
            try:
                if not state[0]:
                    listener.begin()    # a completed bracket: open one for the undo
                for was_add, fr in reversed(calls):
                    if was_add:
                        listener.region_del(fr)
                    else:
                        listener.region_add(fr)
                listener.commit()
            except Exception as exc:  # keep undoing the others
                errors.append(exc)
        return errors


_TXN = _Transaction()
_region._journal = _TXN


def begin() -> None:
    """Open a (nested) memory transaction."""
    _TXN.begin()


def commit() -> None:
    """Close a transaction; the outermost one updates views and listeners."""
    _TXN.commit()


def transaction_depth() -> int:
    return _TXN.depth


class memory_transaction(contextlib.ContextDecorator):  # noqa: N801 - used as a function
    """Group mutations into one update; an exception in the body reverts them.

    A class rather than a generator-based context manager, as it is entered
    on every memslot change; like one, it also decorates functions.
    """

    def _recreate_cm(self) -> memory_transaction:
        return memory_transaction()      # one scope per decorated call

    def __enter__(self) -> None:
        self.mark = len(_TXN.journal)
        _TXN.begin()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            _TXN.revert_to(self.mark)
        _TXN.commit()


def address_spaces() -> list[AddressSpace]:
    """Live address spaces, in creation order."""
    return _TXN.live_spaces()


_space_ids = itertools.count()


class AddressSpace:
    """A root region rendered as a guest-physical map, with listeners."""

    def __init__(self, root: MemoryRegion, name: str) -> None:
        if not isinstance(root, MemoryRegion):
            raise TypeError(f"address space root must be a MemoryRegion, "
                            f"not {type(root).__name__}")
        if not isinstance(name, str):
            raise TypeError(f"address space name must be a str, not {type(name).__name__}")
        self.root = root
        self.name = name
        self.listeners: list[MemoryListener] = []
        self._id = next(_space_ids)
        self._rendered: list[FlatRange] | None = render(root)
        self._view = FlatView(root, simplify(self._rendered))
        _TXN.track(self)

    @property
    def flatview(self) -> FlatView:
        """The current view; immutable, safe to keep and read from any thread."""
        return self._view

    def lookup(self, addr: int) -> FlatRange | None:
        """The flat range holding guest address ``addr`` (MMIO dispatch)."""
        return self._view.lookup(addr)

    def read(self, addr: int, size: int) -> int:
        """A little-endian guest read of ``size`` bytes at ``addr``."""
        fr, offset = self._access(addr, size)
        if fr.region.kind is RegionKind.IO:
            return fr.region.dispatch_read(offset, size)
        host = fr.region.host
        assert host is not None
        return int.from_bytes(host.read(fr.region.host_offset + offset, size), "little")

    def write(self, addr: int, size: int, value: int) -> None:
        """A little-endian guest write; writes to read-only ranges are dropped."""
        fr, offset = self._access(addr, size)
        if fr.region.kind is RegionKind.IO:
            fr.region.dispatch_write(offset, size, value)
        elif not fr.readonly:
            host = fr.region.host
            assert host is not None
            host.write(fr.region.host_offset + offset,
                       (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def add_listener(self, listener: MemoryListener) -> None:
        """Attach ``listener`` and replay the current view to it as additions."""
        if listener.address_space is not None:
            raise ValueError(f"listener already serves address space "
                             f"{listener.address_space.name!r}")
        log = _CallLog()
        try:
            log.notify(listener, [], list(self._view.ranges))
        except BaseException:
            errors = log.undo()
            if errors:
                raise MemoryRollbackError(f"undoing a failed listener replay failed: "
                                          f"{errors[0]}") from errors[0]
            raise
        listener.address_space = self
        self.listeners.append(listener)

    def remove_listener(self, listener: MemoryListener) -> None:
        """Detach ``listener``, telling it every range went away."""
        if listener not in self.listeners:
            raise ValueError(f"listener is not attached to address space {self.name!r}")
        self.listeners.remove(listener)
        listener.address_space = None
        _CallLog().notify(listener, list(self._view.ranges), [])

    def destroy(self) -> None:
        """Detach all listeners and stop tracking the root."""
        for listener in list(self.listeners):
            self.remove_listener(listener)
        _TXN.spaces.pop(self._id, None)

    # Transaction helpers, for callers holding an address space.
    begin = staticmethod(begin)
    commit = staticmethod(commit)
    transaction = staticmethod(memory_transaction)

    def __repr__(self) -> str:
        return f"<AddressSpace {self.name!r} root={self.root.name!r} ranges={len(self._view)}>"

    # -- commit steps ----------------------------------------------------------

    def _prepare(self, placements: list[tuple[Change, Placement]] | None = None
                 ) -> tuple[list[FlatRange] | None, FlatView, list[FlatRange],
                            list[FlatRange]] | None:
        """The update of this space: None when nothing changed, else (full
        rendering or None, new view, removed, added). With ``placements`` the
        view is spliced where it can be instead of rendered again."""
        if placements is not None:
            spliced = update_view(self.root, self._view, placements)
            if spliced is not None:
                view, removed, added = spliced
                if not removed and not added:
                    return None
                return None, view, removed, added
        rendered = render(self.root)
        if rendered is self._rendered:
            return None
        ranges = simplify(rendered)
        removed, added = diff(self._view.ranges, ranges)
        if not removed and not added:
            self._rendered = rendered
            return None
        return rendered, FlatView(self.root, ranges), removed, added

    def _access(self, addr: int, size: int) -> tuple[FlatRange, int]:
        fr = self._view.lookup(addr)
        if fr is None or addr + size > fr.start + fr.size:
            raise UnassignedAccessError(f"{self.name}: no single region maps "
                                        f"[{addr:#x}, +{size})")
        return fr, fr.offset + (addr - fr.start)
