"""The global memory transaction: depth, undo journal, commit and rollback.

Like QEMU's ``memory_region_transaction_begin`` / ``_commit`` there is one
transaction depth for all address spaces.  Every region mutation
(:mod:`kvmmem.memory.region`) is applied to the tree at once and journalled
here with its undo; when the outermost transaction commits, every live
address space (:mod:`kvmmem.memory.address_space`) computes its new flat view
and its listeners are told what changed.  A commit is all-or-nothing: if a
listener or a view computation raises, the listener calls already made are
undone in reverse, the journal is replayed backwards and the original
exception propagates.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvmmem.memory.address_space import AddressSpace, MemoryListener
    from kvmmem.memory.flatview import FlatRange
    from kvmmem.memory.incremental import Placement
    from kvmmem.memory.region import Change, MemoryRegion

__all__ = ["ListenerCallLog", "MemoryRollbackError", "TRANSACTION", "Transaction", "address_spaces", "begin",
           "commit", "memory_transaction", "transaction_depth"]


class MemoryRollbackError(RuntimeError):
    """Undoing a failed commit failed too: the listeners may not match the views."""


class Transaction:
    """The global transaction: depth, undo journal, live address spaces."""

    def __init__(self) -> None:
        self.depth = 0
        self.journal: list[Callable[[], None]] = []
        # Beside each journal entry, the mutation if it is a subregion added
        # or removed (what the incremental commit can do), else None.
        self.changes: list[Change | None] = []
        self.replaying = False
        self.updating = False           # listeners are being called
        self._place: Callable[[Change], Placement | None] | None = None
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
        if self._place is None:
            # incremental.py works on regions, which journal into this module:
            # imported at the first commit, not at the top, so that region.py
            # can import this module.
            from kvmmem.memory.incremental import place as incremental_place
            self._place = incremental_place
        place = self._place
        out = []
        for change in self.changes:
            if change is None:
                return None
            placement = place(change)
            if placement is None or self._is_root(change[1]):
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
        log = ListenerCallLog()
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

    def _rollback(self, log: ListenerCallLog) -> None:
        """Undo applied listener calls and tree mutations after a failed update."""
        errors = log.undo()
        self.updating = False
        self.revert_to(0)
        for space in self.live_spaces():
            space._rendered = None          # next commit compares against the old view
        if errors:
            raise MemoryRollbackError(f"undoing a failed memory commit failed: {errors[0]}"
                                      ) from errors[0]


class ListenerCallLog:
    """The listener calls one update has made, so that they can be undone: per
    bracket, in call order, (listener, [bracket still open?], calls made)."""

    def __init__(self) -> None:
        self.brackets: list[tuple[MemoryListener, list[bool], list[tuple[bool, FlatRange]]]] = []

    def notify(self, listener: MemoryListener, removed: list[FlatRange],
               added: list[FlatRange]) -> None:
        """One bracket: begin, deletions (descending), additions, commit."""
        listener.begin()
        state = [True]
        calls: list[tuple[bool, FlatRange]] = []
        self.brackets.append((listener, state, calls))
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
        for listener, state, calls in reversed(self.brackets):
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
                if not listener.drop(f"undoing a failed memory change failed: {exc}"):
                    errors.append(exc)
        return errors


TRANSACTION = Transaction()


def begin() -> None:
    """Open a (nested) memory transaction."""
    TRANSACTION.begin()


def commit() -> None:
    """Close a transaction; the outermost one updates views and listeners."""
    TRANSACTION.commit()


def transaction_depth() -> int:
    return TRANSACTION.depth


class memory_transaction(contextlib.ContextDecorator):  # noqa: N801 - used as a function
    """Group mutations into one update; an exception in the body reverts them.

    A class rather than a generator-based context manager, as it is entered
    on every memslot change; like one, it also decorates functions.
    """

    def _recreate_cm(self) -> memory_transaction:
        return memory_transaction()      # one scope per decorated call

    def __enter__(self) -> None:
        self.mark = len(TRANSACTION.journal)
        TRANSACTION.begin()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            TRANSACTION.revert_to(self.mark)
        TRANSACTION.commit()


def address_spaces() -> list[AddressSpace]:
    """Live address spaces, in creation order."""
    return TRANSACTION.live_spaces()
