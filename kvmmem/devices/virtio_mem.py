"""The virtio-mem device: requests in, answers out, memslots that follow.

Transport-independent: ``handle`` takes a request's bytes and returns the
response's bytes (``None`` for a protocol violation, after which the device
needs a reset). Each request is parsed, validated in the order of the
facts file (ERROR, NACK, ERROR, BUSY, ACK), processed, and answered. Memory
effects go through :class:`~kvmmem.devices.virtio_mem_backing.VirtioMemBacking`;
a step that fails answers BUSY and leaves bitmap, size, memslots and
protection as they were.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kvmmem.devices.memslot_plan import MemslotMode, PlugBitmap, wanted_memslots
from kvmmem.devices.virtio_mem_backing import VirtioMemBacking
from kvmmem.devices.virtio_mem_proto import (
    VIRTIO_F_VERSION_1, VIRTIO_ID_MEM, VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE, BlockState, Config,
    InvalidRange, MalformedRequest, Request, RequestType, Response, usable_region_size,
    validate_range)
from kvmmem.devices.virtio_mem_props import (
    ProtectMode, VirtioMemPropertyError, VirtioMemProps, check_requested_size)
from kvmmem.kvm.error import KvmError
from kvmmem.memory.host import HostMemory, HostMemoryError
from kvmmem.memory.region import MemoryRegion

log = logging.getLogger(__name__)

QUEUE_SIZE = 128
_HOST_FAILURES = (KvmError, HostMemoryError, OSError)


class VirtioMem:
    """One virtio-mem device (VIRTIO 1.2, "Memory Device").

    Created unplugged; ``realize`` (called by the machine) gives it its
    guest address and memslot size and maps what the mode wants.
    """

    device_id = VIRTIO_ID_MEM
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, props: VirtioMemProps) -> None:
        self.props = props
        self.memdev = props.memdev or HostMemory(props.region_size, name=f"{props.id}-memdev")
        self.on_config_change: Callable[[], None] | None = None
        self.on_size_change: Callable[[int], None] | None = None
        self.on_memslots_change: Callable[[int], None] | None = None
        self.admit_requested_size: Callable[[int], None] | None = None
        """Set by the machine: raises if a requested-size would cost too much."""
        self.needs_reset = False
        self.driver_features = 0
        self.addr = -1
        self.plugged_size = 0
        self.usable_region_size = 0
        self.backing: VirtioMemBacking | None = None
        self.bitmap: PlugBitmap | None = None

    # -- life cycle (machine side) -----------------------------------------

    @property
    def id(self) -> str:
        return self.props.id

    @property
    def region_size(self) -> int:
        return self.memdev.size

    @property
    def block_size(self) -> int:
        return self.props.block_size

    @property
    def requested_size(self) -> int:
        return self.props.requested_size

    @property
    def realized(self) -> bool:
        return self.backing is not None

    def realize(self, addr: int, memslot_size: int) -> MemoryRegion:
        """Fix the guest address and memslot size; return the region the
        machine maps at ``addr`` (call inside a memory transaction)."""
        if self.backing is not None:
            raise RuntimeError(f"{self.id} is already realized")
        backing = VirtioMemBacking(self.memdev, self.props.memslots, memslot_size,
                                   self.block_size, self.props.protect is ProtectMode.BLOCK)
        bits = self.bitmap = PlugBitmap(self.region_size // self.block_size,
                                        backing.blocks_per_memslot)
        self.backing, self.addr = backing, addr
        self.usable_region_size = self._usable_target()
        self._sync_memslots(backing, bits)
        return backing.top

    def unrealize(self) -> MemoryRegion:
        """Unplug everything and unmap; return the region to remove."""
        backing = self._backing()
        self._unplug_all()
        self.usable_region_size = 0
        if backing.mode is not MemslotMode.SINGLE:
            backing.set_mapped(frozenset(), self._bits())
        self.backing, self.bitmap, self.addr = None, None, -1
        return backing.top

    def system_reset(self) -> None:
        """Machine reset: everything is unplugged, the usable region shrinks."""
        self.needs_reset = False
        self.driver_features = 0
        if self.realized:
            self._unplug_all()

    def reset(self) -> None:
        """Device (driver) reset: negotiation starts over, plug state stays."""
        self.needs_reset = False
        self.driver_features = 0

    # -- virtio device interface ------------------------------------------

    def device_features(self) -> int:
        features = 1 << VIRTIO_F_VERSION_1
        if self.props.unplugged_inaccessible:
            features |= 1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE
        return features

    def set_driver_features(self, features: int) -> bool:
        """Accept the driver's features, or refuse them (FEATURES_OK fails):
        unknown bits, no VERSION_1, or unplugged-inaccessible not accepted."""
        offered = self.device_features()
        if features & ~offered or not features & (1 << VIRTIO_F_VERSION_1):
            return False
        if offered & (1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE) and \
                not features & (1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE):
            return False
        self.driver_features = features
        return True

    def config(self) -> Config:
        return Config(block_size=self.block_size, node_id=self.props.node, addr=max(self.addr, 0),
                      region_size=self.region_size, usable_region_size=self.usable_region_size,
                      plugged_size=self.plugged_size, requested_size=self.requested_size)

    def read_config(self, offset: int, size: int) -> bytes:
        return self.config().read(offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        """The config space is read-only for the driver; writes are dropped."""
        log.debug("%s: driver wrote %d config bytes at %#x, ignored", self.id, len(data), offset)

    def handle(self, queue: int, request: bytes, response_capacity: int) -> bytes | None:
        """One guest request; None when it violates the protocol."""
        try:
            req = Request.parse(request)
        except MalformedRequest as exc:
            return self._violation(str(exc))
        if queue != 0 or response_capacity < 10:
            return self._violation(f"response buffer of {response_capacity} bytes on queue {queue}")
        return self.process(req).pack()

    # -- requests -----------------------------------------------------------

    def process(self, req: Request) -> Response:
        """Validate, process and answer one parsed request."""
        bits = self.bitmap
        if self.backing is None or bits is None:
            return Response.error()
        rtype = req.type
        if rtype is RequestType.UNPLUG_ALL:
            return self._step(self._unplug_all)
        block_size = self.props.block_size
        try:
            first = validate_range(req.addr, req.nb_blocks, region_addr=self.addr,
                                   usable_region_size=self.usable_region_size,
                                   block_size=block_size)
        except InvalidRange as exc:
            log.debug("%s: %s -> ERROR (%s)", self.id, req, exc)
            return Response.error()
        n = req.nb_blocks
        if rtype is RequestType.STATE:
            return Response.ack(bits.state(first, n))
        plug = rtype is RequestType.PLUG
        if plug and self.plugged_size + n * block_size > self.props.requested_size:
            return Response.nack()
        if bits.any_in_state(first, n, plugged=plug):
            return Response.error()
        return self._step(self._plug if plug else self._unplug, first, n)

    def _step(self, step: Callable[..., None], *args: int) -> Response:
        """Do a validated request: ACK, or BUSY if the host side failed (then
        nothing changed)."""
        try:
            step(*args)
        except _HOST_FAILURES as exc:
            log.warning("%s: request failed on the host side, answering BUSY: %s", self.id, exc)
            return Response.busy()
        return Response.ack()

    # PLUG and UNPLUG change only the memslots they touch: in dynamic mode
    # exactly those the bitmap reports populated or emptied (the mapped
    # memslots are the populated ones), in the other modes none.

    def _plug(self, first: int, n: int) -> None:
        backing, bits = self.backing, self.bitmap
        assert backing is not None and bits is not None     # process() checked
        backing.acquire(first, n, self.props.prealloc)
        populated = bits.plug(first, n)
        if populated and backing.mode is MemslotMode.DYNAMIC:
            try:
                self._remap(backing, bits, (), populated)
            except BaseException:
                bits.unplug(first, n)
                backing.release([(first, n)])
                raise
        self._set_plugged(bits)

    def _unplug(self, first: int, n: int) -> None:
        backing, bits = self.backing, self.bitmap
        assert backing is not None and bits is not None     # process() checked
        emptied = bits.unplug(first, n)
        if emptied and backing.mode is MemslotMode.DYNAMIC:
            try:
                self._remap(backing, bits, emptied, ())
            except BaseException:
                bits.plug(first, n)
                raise
        backing.release([(first, n)])
        self._set_plugged(bits)

    def _unplug_all(self) -> None:
        backing, bits = self._backing(), self._bits()
        runs = list(bits.plugged_runs())
        old_usable = self.usable_region_size
        bits.clear()
        self.usable_region_size = self._usable_target()
        try:
            self._sync_memslots(backing, bits)
        except BaseException:
            for first, n in runs:
                bits.plug(first, n)
            self.usable_region_size = old_usable
            raise
        backing.release(runs)
        self._set_plugged(bits)
        if self.usable_region_size != old_usable:
            self._notify_config()

    # -- control (QMP-like) -----------------------------------------------

    def set_requested_size(self, size: int) -> None:
        """Ask the guest to plug or unplug memory up to ``size`` bytes."""
        check_requested_size(self.id, size, self.region_size, self.block_size)
        if size == self.requested_size:
            return
        if self.admit_requested_size is not None:
            try:
                self.admit_requested_size(size)
            except ValueError as exc:
                raise VirtioMemPropertyError(str(exc)) from None
        old_requested, old_usable = self.requested_size, self.usable_region_size
        self.props.requested_size = size
        if self.realized:
            self.usable_region_size = max(old_usable, self._usable_target())
            try:
                self._sync_memslots(self._backing(), self._bits())
            except _HOST_FAILURES as exc:
                self.props.requested_size, self.usable_region_size = old_requested, old_usable
                raise VirtioMemPropertyError(f"{self.id}: cannot map memslots for "
                                             f"requested-size {size:#x}: {exc}") from exc
        self._notify_config()

    def properties(self) -> dict[str, Any]:
        """Every property under its QEMU name, plus the live sizes."""
        p = self.props
        return {"id": p.id, "memdev": self.memdev.name, "size": self.plugged_size,
                "max-size": self.region_size, "block-size": p.block_size,
                "requested-size": p.requested_size, "node": p.node,
                "memaddr": self.addr if self.realized else p.memaddr, "prealloc": p.prealloc,
                "unplugged-inaccessible": p.unplugged_inaccessible,
                "max-memslots": p.max_memslots, "memslots": p.memslots.value,
                "protect": p.protect.value, "usable-region-size": self.usable_region_size}

    # -- helpers ------------------------------------------------------------

    def _usable_target(self) -> int:
        return usable_region_size(self.region_size, self.requested_size, self.block_size)

    def _sync_memslots(self, backing: VirtioMemBacking, bits: PlugBitmap) -> None:
        """Map exactly the memslots the mode wants now."""
        if backing.mode is MemslotMode.SINGLE:
            return
        before = backing.nb_mapped
        backing.set_mapped(wanted_memslots(backing.mode, backing.memslot_size,
                                           self.usable_region_size, bits), bits)
        if backing.nb_mapped != before and self.on_memslots_change is not None:
            self.on_memslots_change(backing.nb_mapped)

    def _remap(self, backing: VirtioMemBacking, bits: PlugBitmap,
               unmap: tuple[int, ...], map: tuple[int, ...]) -> None:
        backing.remap(unmap, map, bits)
        if self.on_memslots_change is not None:
            self.on_memslots_change(backing.nb_mapped)

    def _set_plugged(self, bits: PlugBitmap) -> None:
        size = bits.plugged_count * self.props.block_size
        if size != self.plugged_size:
            self.plugged_size = size
            if self.on_size_change is not None:
                self.on_size_change(size)

    def _notify_config(self) -> None:
        if self.on_config_change is not None:
            self.on_config_change()

    def _violation(self, why: str) -> None:
        log.warning("%s: protocol violation, device needs reset: %s", self.id, why)
        self.needs_reset = True
        return None

    def _backing(self) -> VirtioMemBacking:
        if self.backing is None:
            raise RuntimeError(f"{self.id} is not realized (plug it into a machine first)")
        return self.backing

    def _bits(self) -> PlugBitmap:
        if self.bitmap is None:
            raise RuntimeError(f"{self.id} is not realized (plug it into a machine first)")
        return self.bitmap

    @property
    def memslot_size(self) -> int:
        return self._backing().memslot_size

    @property
    def mapped_memslots(self) -> frozenset[int]:
        """Indices of the memslots mapped now (single mode: {0})."""
        backing = self._backing()
        return frozenset({0}) if backing.mode is MemslotMode.SINGLE else backing.mapped

    def state_of(self, block: int) -> BlockState:
        return BlockState.PLUGGED if self._bits().is_plugged(block) else BlockState.UNPLUGGED


__all__ = ["VirtioMem", "VirtioMemProps", "VirtioMemPropertyError", "ProtectMode", "MemslotMode"]
