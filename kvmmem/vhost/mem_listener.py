"""The vhost memory listener: the back-end maps the same RAM sections as KVM.

Attached to the system address space next to the KVM listener, it shows a
vhost-user back-end every RAM flat range the guest can reach, so that the
back-end can translate ring and buffer addresses. With the
CONFIGURE_MEM_SLOTS protocol feature each range is one ADD_MEM_REG when it
appears and one REM_MEM_REG when it goes (QEMU's ``vhost_user_add_remove_regions``);
without it the whole table is sent again with SET_MEM_TABLE at the end of
each update that changed it (at most 8 regions). The memory layer never
merges virtio-mem's unmergeable memslot aliases, so plugging a block maps
one region and never remaps a neighbour (QEMU's "vhost: Don't merge
unmergeable memory sections"). Where a memslot over plugged memory is
replaced (``memslots=exact``'s merges, splits and coarsening) the address
space's ``quiesced`` comes first: :meth:`VhostMemoryListener.quiesced` lets
the back-end finish its requests and stops its rings, so no request is in
flight when its mapping goes.

Only shared memory can be handed over: a RAM range whose host memory has no
memfd is refused with :class:`VhostUserError` (the commit then rolls back),
as is a range beyond the back-end's slot limit. A back-end that has gone
away is no memslot consumer any more (QEMU's vhost_dev_cleanup() unregisters
its listener): from the disconnection on the listener sends, refuses and
tracks nothing, and the VM's memory goes on without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from kvmmem.memory import PAGE_SIZE, FlatRange, MemoryListener, RegionKind
from kvmmem.vhost.frontend import BackendGone, VhostUserError, VhostUserFrontend
from kvmmem.vhost.messages import (
    MemoryRegionDesc,
    ProtocolFeature,
    Request,
    pack_memory_table,
)

__all__ = ["MirroredRegion", "VhostMemoryListener"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MirroredRegion:
    """One RAM range the back-end has mapped, and the memfd it maps it from."""

    desc: MemoryRegionDesc
    fd: int
    region: str


class VhostMemoryListener(MemoryListener):
    """Keeps a vhost-user back-end's memory table equal to the RAM ranges of one address space."""

    def __init__(self, frontend: VhostUserFrontend) -> None:
        self.frontend = frontend
        self.limit = frontend.max_mem_slots
        self.incremental = frontend.has(ProtocolFeature.CONFIGURE_MEM_SLOTS)
        self._regions: dict[int, tuple[FlatRange, MirroredRegion]] = {}
        self._table_changed = False
        self._table_grew = False
        self.quiesce_queues: Callable[[], AbstractContextManager[object]] = nullcontext
        """Stops the back-end's rings with nothing in flight (the device installs
        ``VhostUserBlk.quiesced``)."""
        frontend.on_disconnect.append(self._backend_gone)

    def _backend_gone(self, reason: str) -> None:
        """The back-end maps nothing any more (from its watcher thread, or a failing request)."""
        self._regions.clear()

    @property
    def used(self) -> int:
        """Memory slots of the back-end in use (one per RAM range)."""
        return len(self._regions)

    def free(self) -> int:
        """The back-end's free memory slots (QEMU's ``vhost_get_free_memslots``)."""
        return max(0, self.limit - len(self._regions))

    def regions(self) -> list[MirroredRegion]:
        """The regions the back-end has been given, by guest address."""
        return [entry[1] for _, entry in sorted(self._regions.items())]

    # -- the listener protocol --------------------------------------------------

    def quiesced(self) -> AbstractContextManager[object]:
        """Before a range over live data is removed or replaced: the back-end's
        requests finish and its rings stop (see ``VhostUserBlk.quiesced``)."""
        if not self.frontend.connected:
            return nullcontext()
        return self.quiesce_queues()

    def drop(self, reason: str) -> bool:
        """A rollback could not undo what was sent: the back-end's table is
        unknown, so it is let go (and stops limiting the memslot budget)."""
        self.frontend.fail(reason)
        return True

    def begin(self) -> None:
        self._table_changed = False
        self._table_grew = False

    def region_add(self, fr: FlatRange) -> None:
        if fr.region.kind is not RegionKind.RAM or not self.frontend.connected:
            return
        mirrored = _describe(fr, self.frontend.name)
        if mirrored is None:
            return                       # smaller than a page: no back-end access either
        if len(self._regions) >= self.limit:
            raise VhostUserError(f"{self.frontend.name}: the vhost-user back-end has no free "
                                 f"memory slot for {fr.name} at {fr.start:#x} (all {self.limit} "
                                 f"in use)")
        if self.incremental:
            self._send(Request.ADD_MEM_REG, mirrored.desc.pack_single(), [mirrored.fd])
        else:
            self._table_changed = self._table_grew = True
        if self.frontend.connected:        # not if the request found the back-end gone
            self._regions[fr.start] = (fr, mirrored)

    def region_del(self, fr: FlatRange) -> None:
        entry = self._regions.get(fr.start)
        if entry is None:
            return
        if entry[0] != fr:
            raise RuntimeError(f"vhost listener out of sync: asked to remove {fr}, "
                               f"but {entry[0]} is mapped there")
        self._regions.pop(fr.start, None)
        if self.incremental:
            # No fd: the specification says none SHOULD be passed (the
            # region is found by its addresses and size).
            self._send_removal(Request.REM_MEM_REG, entry[1].desc.pack_single(), [])
        else:
            self._table_changed = True

    def commit(self) -> None:
        if self._table_changed:
            self._table_changed = False
            regions = self.regions()
            payload = pack_memory_table([r.desc for r in regions])
            fds = [r.fd for r in regions]
            if self._table_grew:
                self._send(Request.SET_MEM_TABLE, payload, fds)
            else:
                self._send_removal(Request.SET_MEM_TABLE, payload, fds)

    # -- internals ------------------------------------------------------------------

    def _send_removal(self, req: Request, payload: bytes, fds: list[int]) -> None:
        """A removal cannot be refused (the memory is going, whatever the back-end
        says; QEMU's vhost commit only logs): a back-end that refuses it may keep
        a mapping of memory the guest no longer has, so it is let go."""
        try:
            self._send(req, payload, fds)
        except VhostUserError as exc:
            log.error("%s: %s refused, the back-end is dropped: %s", self.frontend.name,
                      req.name, exc)
            self.frontend.fail(f"{req.name} refused")

    def _send(self, req: Request, payload: bytes, fds: list[int]) -> None:
        """Send a memory request; a refusal raises, a dead back-end does not."""
        if not self.frontend.connected:
            return
        try:
            self.frontend.request(req, payload, fds)
        except BackendGone as exc:
            log.error("%s: %s not delivered: %s", self.frontend.name, req.name, exc)


def _describe(fr: FlatRange, name: str) -> MirroredRegion | None:
    """The back-end's view of a RAM range: its whole pages, from the host memory's memfd."""
    start = -(-fr.start // PAGE_SIZE) * PAGE_SIZE
    end = (fr.start + fr.size) // PAGE_SIZE * PAGE_SIZE
    if end <= start:
        return None
    host = fr.region.host
    assert host is not None
    if host.fd < 0:
        raise VhostUserError(f"{name}: guest memory {host.name!r} is not shared, so the "
                             f"vhost-user back-end cannot map it; back it with "
                             f"memory-backend-memfd or memory-backend-ram,share=on")
    offset = fr.region.host_offset + fr.offset + (start - fr.start)
    desc = MemoryRegionDesc(start, end - start, host.address + offset, offset)
    return MirroredRegion(desc, host.fd, host.name)
