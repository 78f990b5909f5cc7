"""Address spaces and the listener protocol.

An :class:`AddressSpace` is a root region seen as a guest-physical map: it
holds the current :class:`FlatView` and tells its listeners (KVM, later
vhost) what changed.  Region mutations reach the flat views and the
listeners when the outermost memory transaction commits
(:mod:`kvmmem.memory.transaction`, whose names are re-exported here), as one
update per address space; a listener that raises makes the whole commit roll
back.

Most commits add or remove a few subregions that overlap nothing; those
splice the old view where the change shows (:mod:`kvmmem.memory.incremental`)
instead of rendering the address space again, so their cost does not grow
with the number of ranges.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext

from kvmmem.memory.flatview import FlatRange, FlatView, diff, render, simplify
from kvmmem.memory.incremental import Placement, update_view
from kvmmem.memory.region import Change, MemoryRegion, RegionKind
from kvmmem.memory.transaction import (
    TRANSACTION,
    ListenerCallLog,
    MemoryRollbackError,
    address_spaces,
    begin,
    commit,
    memory_transaction,
    transaction_depth,
)

__all__ = ["AddressSpace", "MemoryListener", "MemoryRollbackError", "UnassignedAccessError",
           "begin", "commit", "memory_transaction", "transaction_depth", "address_spaces"]


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

    def drop(self, reason: str) -> bool:
        """A rollback could not undo this listener's calls: stop following the
        address space if the consumer can be let go (a vhost-user back-end is
        treated as gone, QEMU's ``vhost_dev_cleanup``) and return True; False
        (the default, KVM's) makes the failure a :class:`MemoryRollbackError`."""
        return False

    def quiesced(self) -> AbstractContextManager[object]:
        """Inside this block the consumer behind the listener does not touch
        guest memory. Entered (through :meth:`AddressSpace.quiesced`) around a
        commit that removes or replaces a range over memory the guest is using:
        no consumer has an atomic replace (KVM's ``api.rst`` on
        ``KVM_SET_USER_MEMORY_REGION``; vhost-user's REM_MEM_REG / ADD_MEM_REG),
        so whoever may be reading or writing the range must stop first. KVM
        stops its vCPUs, a vhost-user back-end finishes its requests and stops
        its rings; a consumer with nothing in flight needs nothing (default).
        Raising refuses the change (nothing has changed yet)."""
        return nullcontext()


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
        TRANSACTION.track(self)

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

    @contextmanager
    def quiesced(self) -> Iterator[None]:
        """Every listener's :meth:`MemoryListener.quiesced`, entered in the order
        the listeners were attached (KVM's first: its vCPUs stop before a
        back-end's rings are drained, so no new request can arrive meanwhile)
        and left in reverse. The one rule for every memory consumer: a range
        over live guest data is removed or moved only inside this block."""
        with ExitStack() as stack:
            for listener in list(self.listeners):
                stack.enter_context(listener.quiesced())
            yield

    def add_listener(self, listener: MemoryListener) -> None:
        """Attach ``listener`` and replay the current view to it as additions."""
        if listener.address_space is not None:
            raise ValueError(f"listener already serves address space "
                             f"{listener.address_space.name!r}")
        log = ListenerCallLog()
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
        ListenerCallLog().notify(listener, list(self._view.ranges), [])

    def destroy(self) -> None:
        """Detach all listeners and stop tracking the root."""
        for listener in list(self.listeners):
            self.remove_listener(listener)
        TRANSACTION.spaces.pop(self._id, None)

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
