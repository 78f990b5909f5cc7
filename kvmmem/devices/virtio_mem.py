"""The virtio-mem device: requests in, answers out, memslots that follow.

Transport-independent: ``handle`` takes a request's bytes and returns the
response's bytes (``None`` for a protocol violation, after which the device
needs a reset). A request reads top to bottom as QEMU's
``virtio_mem_handle_request`` -> ``virtio_mem_plug_request`` ->
``virtio_mem_state_change_request`` -> ``virtio_mem_set_block_state``:
range check (ERROR), size check (NACK), state check (ERROR), then one
state-change step that changes the bitmap, applies the memslot policy's
answer and guards or releases host pages, and answers ACK, or BUSY with
nothing changed (VIRTIO 1.2, 5.15.6.2 "Device Requirements: Device
Operation").

Observers subscribe to ``config_change_notifiers`` (the transport, for its
config interrupt) and ``size_change_notifiers`` (QMP's
MEMORY_DEVICE_SIZE_CHANGE); the memslot budget counts the device's
memslots by listening to the memory layer, so the device reports nothing.

``memslots=exact`` with a ``merge-delay`` answers a plug without merging
its memslots with their neighbours; ``merge_notifiers`` fire after each
such plug, and whoever runs the device calls :meth:`VirtioMem.merge_memslots`
once ``merge-delay`` milliseconds passed without another (the kvmmem VMM
does, from a thread of its own; see ``exact_cover``, "Deferred merges").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from kvmmem.devices.block_protection import BlockProtection
from kvmmem.devices.memslot_policy import MemslotChange, MemslotMode, MemslotPolicy, make_policy
from kvmmem.devices.notifier import Notifier
from kvmmem.devices.plug_bitmap import PlugBitmap
from kvmmem.devices.ratelimit import RateLimit
from kvmmem.devices.virtio_mem_backing import VirtioMemBacking
from kvmmem.devices.virtio_mem_props import ProtectMode, VirtioMemPropertyError, VirtioMemProps, check_requested_size
from kvmmem.devices.virtio_mem_proto import (
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_MEM,
    VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
    Config,
    InvalidRange,
    MalformedRequest,
    Request,
    RequestType,
    Response,
    usable_region_size,
    validate_range,
)
from kvmmem.memory.host import HostMemory, HostMemoryError
from kvmmem.memory.region import MemoryRegion

log = logging.getLogger(__name__)

QUEUE_SIZE = 128
# A memslot KVM refuses reaches the device as the memory layer's listener
# error (KvmError is an OSError), a failed madvise as HostMemoryError.
_HOST_FAILURES = (HostMemoryError, OSError)


class VirtioMem:
    """One virtio-mem device (VIRTIO 1.2, "Memory Device").

    Created unplugged; ``realize`` (called by the machine) gives it its
    guest address and memslot size, chooses its memslot policy and maps
    what the policy wants.
    """

    device_id = VIRTIO_ID_MEM
    queue_max_sizes: tuple[int, ...] = (QUEUE_SIZE,)

    def __init__(self, props: VirtioMemProps) -> None:
        self.props = props
        self.memdev = props.memdev or HostMemory(props.region_size, name=f"{props.id}-memdev")
        self.config_change_notifiers: Notifier[None] = Notifier()
        self.size_change_notifiers: Notifier[int] = Notifier()
        self.merge_notifiers: Notifier[None] = Notifier()
        self.admit_requested_size: Callable[[int], None] | None = None
        """Set by the machine: raises if a requested-size would cost too much."""
        self.needs_reset = False
        self.driver_features = 0
        self.busy_log = RateLimit()
        self.migrating = False
        """While the machine migrates, plug state is frozen: PLUG, UNPLUG and
        UNPLUG_ALL are answered BUSY and requested-size cannot change (QEMU's
        ``virtio_mem_is_busy``)."""
        self.addr = -1
        self.plugged_size = 0
        self.usable_region_size = 0
        self.backing: VirtioMemBacking | None = None
        self.bitmap: PlugBitmap | None = None
        self.policy: MemslotPolicy | None = None
        self.protection: BlockProtection | None = None
        self.quiesce: Callable[[], AbstractContextManager[object]] = nullcontext
        """Stops every consumer of guest memory (vCPUs, vhost-user back-ends)
        for a memslot change that deletes a memslot over plugged blocks (no
        consumer can replace one atomically): the machine memory that plugs
        the device installs its address space's ``quiesced``."""

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

    @property
    def ram(self) -> MemoryRegion:
        """The device's RAM region (what its memslots alias)."""
        return self._backing().ram

    def realize(self, addr: int, memslot_size: int) -> MemoryRegion:
        """Fix the guest address and memslot size, choose the memslot policy;
        return the region the machine maps at ``addr`` (call inside a memory
        transaction)."""
        if self.backing is not None:
            raise RuntimeError(f"{self.id} is already realized")
        bits = PlugBitmap(self.region_size // self.block_size)
        policy = make_policy(self.props.memslots, self.region_size, memslot_size,
                             self.block_size, bits, self.id)
        policy.defer_merges = self.props.merge_delay > 0
        backing = VirtioMemBacking(self.memdev, policy.maps_aliases, policy.alias_name)
        protection = None
        if self.props.protect is ProtectMode.BLOCK:
            protection = BlockProtection(self.memdev, self.block_size, bits, policy.memslot_at)
        self.backing, self.bitmap, self.policy, self.protection = backing, bits, policy, protection
        self.addr = addr
        self.usable_region_size = self._usable_target()
        self._apply(policy.resync(self.usable_region_size))
        return backing.top

    def unrealize(self) -> MemoryRegion:
        """Unplug everything and unmap; return the region to remove."""
        backing = self._backing()
        self._unplug_all()
        self.usable_region_size = 0
        self._apply(self._policy().unmap_all())
        self.unbind()
        return backing.top

    def unbind(self) -> None:
        """Forget the machine-side state (after unrealize, or a realize the
        machine rolled back)."""
        self.backing = self.bitmap = self.policy = self.protection = None
        self.addr = -1

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
            self._violation(str(exc))
            return None
        if queue != 0 or response_capacity < 10:
            self._violation(f"response buffer of {response_capacity} bytes on queue {queue}")
            return None
        return self.process(req).pack()

    # -- requests -----------------------------------------------------------

    def process(self, req: Request) -> Response:
        """Validate, process and answer one parsed request
        (``virtio_mem_handle_request``)."""
        bits = self.bitmap
        if bits is None:
            return Response.error()
        rtype = req.type
        if self.migrating and rtype is not RequestType.STATE:
            return Response.busy()          # the guest retries once migration is over
        if rtype is RequestType.UNPLUG_ALL:
            try:
                self._unplug_all()
            except _HOST_FAILURES as exc:
                return self._busy(exc)
            return Response.ack()
        block_size = self.props.block_size
        try:                                                    # range check: ERROR
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
            return Response.nack()                              # size check: NACK
        if bits.any_in_state(first, n, plugged=plug):
            return Response.error()                             # state check: ERROR
        try:
            if plug:
                self._plug(first, n)
            else:
                self._unplug(first, n)
        except _HOST_FAILURES as exc:
            return self._busy(exc)
        return Response.ack()

    def _busy(self, exc: BaseException) -> Response:
        """A state change failed on the host side and changed nothing: BUSY."""
        if (held := self.busy_log.check()) is not None:     # the guest may retry at will
            log.warning("%s: request failed on the host side, answering BUSY: %s%s", self.id,
                        exc, RateLimit.note(held))
        return Response.busy()

    # The state changes (virtio_mem_set_block_state). Each one either
    # completes or raises with bitmap, memslots and guards as they were.

    def _plug(self, first: int, n: int) -> None:
        bits, policy, protection = self.bitmap, self.policy, self.protection
        assert bits is not None and policy is not None      # process() checked
        bs = self.props.block_size
        if protection is not None:
            protection.before_plug(first, n)
        try:
            if self.props.prealloc:
                self.memdev.populate(first * bs, n * bs)
            bits.set(first, n, True)
            try:
                self._apply(policy.plug(first, n))
            except BaseException:
                bits.set(first, n, False)
                raise
        except BaseException:
            self._release(first, n)
            raise
        self._set_plugged(bits)
        if policy.merge_pending and self.merge_notifiers:
            self.merge_notifiers.notify(None)

    def _unplug(self, first: int, n: int) -> None:
        bits, policy = self.bitmap, self.policy
        assert bits is not None and policy is not None      # process() checked
        bits.set(first, n, False)
        try:
            self._apply(policy.unplug(first, n))
        except BaseException:
            bits.set(first, n, True)
            raise
        self._release(first, n)
        self._set_plugged(bits)

    def _unplug_all(self) -> None:
        bits, policy = self._bits(), self._policy()
        runs = list(bits.plugged_runs())
        old_usable = self.usable_region_size
        bits.clear(runs)
        self.usable_region_size = self._usable_target()
        try:
            self._apply(policy.resync(self.usable_region_size))
        except BaseException:
            for first, n in runs:
                bits.set(first, n, True)
            self.usable_region_size = old_usable
            raise
        for first, n in runs:
            self._release(first, n)
        self._set_plugged(bits)
        if self.usable_region_size != old_usable and self.config_change_notifiers:
            self.config_change_notifiers.notify(None)

    def _apply(self, change: MemslotChange) -> None:
        """Unmap and map what the policy answered (``virtio_mem_activate_memslot``
        and its reverse), guarding the unplugged blocks of mapped memslots."""
        if not (change.unmap or change.map):
            return
        backing, policy, protection = self.backing, self.policy, self.protection
        assert backing is not None and policy is not None   # realized
        if protection is not None:
            protection.before_map(change.map)
        # A merge or split (memslots=exact) deletes a memslot the guest may be
        # using and creates its replacement: no consumer (vCPU, vhost-user
        # back-end) may touch the memory in between.
        stop = self.quiesce() if change.unmap and policy.deletes_plugged(change) else nullcontext()
        try:
            with stop:
                backing.remap(change.unmap, change.map)
        except BaseException:
            if protection is not None:
                protection.after_unmap(change.map)
            raise
        policy.commit(change)
        if protection is not None:
            protection.after_unmap(change.unmap)

    def _release(self, first: int, n: int) -> None:
        """Give unplugged blocks back to the host (guarded first where mapped)."""
        bs = self.props.block_size
        if self.protection is not None:
            self.protection.after_unplug(first, n)
        self.memdev.discard(first * bs, n * bs)

    # -- deferred merges ----------------------------------------------------

    @property
    def merges_pending(self) -> bool:
        """Whether plugs left memslots for :meth:`merge_memslots` to merge."""
        return self.policy is not None and self.policy.merge_pending

    def merge_memslots(self, one_group: bool = False) -> bool:
        """Merge the memslots deferred plugs left (call with the guest quiet
        or not: vCPUs are stopped around the change as for any merge);
        ``one_group``: only those of the lowest group of grid memslots one
        largest memslot spans (8 GiB with 1 GiB memslots), so that vCPUs stop
        for one group at a time. True if merges were pending and done; a
        failure is logged and changes nothing (the merges stay pending)."""
        policy = self.policy
        if policy is None or not policy.merge_pending:
            return False
        try:
            self._apply(policy.merge(one_group))
        except _HOST_FAILURES as exc:
            log.warning("%s: deferred memslot merge failed, memslots left as they were: %s",
                        self.id, exc)
            return False
        return True

    # -- snapshot ----------------------------------------------------------

    def save_state(self) -> dict[str, Any]:
        """What a snapshot keeps of the device (QEMU's ``vmstate_virtio_mem``:
        the plug bitmap, the sizes; the memslots follow from them)."""
        bits = self._bits()
        return {"requested_size": self.requested_size,
                "usable_region_size": self.usable_region_size,
                "driver_features": self.driver_features, "needs_reset": self.needs_reset,
                "plugged": [list(run) for run in bits.plugged_runs()]}

    def load_state(self, state: dict[str, Any]) -> None:
        """Into a device that has nothing plugged yet: the sizes, then the saved
        blocks plugged, with their memslots mapped (before any RAM arrives, as
        QEMU's early virtio-mem migration does). Refused (ValueError, nothing
        plugged) when the state does not fit the device."""
        bits, policy = self._bits(), self._policy()
        if bits.plugged_count:
            raise ValueError(f"{self.id}: the device has blocks plugged already")
        requested, usable = state["requested_size"], state["usable_region_size"]
        check_requested_size(self.id, requested, self.region_size, self.block_size)
        if usable % self.block_size or not requested <= usable <= self.region_size:
            raise ValueError(f"{self.id}: usable region {usable:#x} does not fit the device")
        runs = [(int(first), int(n)) for first, n in state["plugged"]]
        usable_blocks = usable // self.block_size
        if any(n <= 0 or first < 0 or first + n > usable_blocks for first, n in runs) or \
                sum(n for _, n in runs) * self.block_size > requested:
            raise ValueError(f"{self.id}: plugged blocks outside the usable region or beyond "
                             "requested-size")
        ordered = sorted(runs)
        if any(a + n > b for (a, n), (b, _) in zip(ordered, ordered[1:])):
            raise ValueError(f"{self.id}: overlapping plugged runs")
        self.props.requested_size, self.usable_region_size = requested, usable
        self.driver_features, self.needs_reset = state["driver_features"], state["needs_reset"]
        self._apply(policy.resync(usable))
        for first, n in ordered:          # as the guest's requests did
            self._plug(first, n)
        if policy.merge_pending:
            self._apply(policy.merge(False))

    # -- control (QMP-like) -----------------------------------------------

    def set_requested_size(self, size: int) -> None:
        """Ask the guest to plug or unplug memory up to ``size`` bytes."""
        check_requested_size(self.id, size, self.region_size, self.block_size)
        if size == self.requested_size:
            return
        if self.migrating:
            raise VirtioMemPropertyError(f"{self.id}: requested-size cannot change while the "
                                         "machine migrates")
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
                self._apply(self._policy().resync(self.usable_region_size))
            except _HOST_FAILURES as exc:
                self.props.requested_size, self.usable_region_size = old_requested, old_usable
                raise VirtioMemPropertyError(f"{self.id}: cannot map memslots for "
                                             f"requested-size {size:#x}: {exc}") from exc
        if self.config_change_notifiers:
            self.config_change_notifiers.notify(None)

    def properties(self) -> dict[str, Any]:
        """Every property under its QEMU name, plus the live sizes."""
        p = self.props
        return {"id": p.id, "memdev": self.memdev.name, "size": self.plugged_size,
                "max-size": self.region_size, "block-size": p.block_size,
                "requested-size": p.requested_size, "node": p.node,
                "memaddr": self.addr if self.realized else p.memaddr, "prealloc": p.prealloc,
                "unplugged-inaccessible": p.unplugged_inaccessible,
                "max-memslots": p.max_memslots, "memslots": p.memslots.value,
                "protect": p.protect.value, "merge-delay": p.merge_delay,
                "usable-region-size": self.usable_region_size}

    # -- helpers ------------------------------------------------------------

    def _usable_target(self) -> int:
        return usable_region_size(self.region_size, self.requested_size, self.block_size)

    def _set_plugged(self, bits: PlugBitmap) -> None:
        size = bits.plugged_count * self.props.block_size
        if size != self.plugged_size:
            self.plugged_size = size
            if self.size_change_notifiers:
                self.size_change_notifiers.notify(size)

    def _violation(self, why: str) -> None:
        log.warning("%s: protocol violation, device needs reset: %s", self.id, why)
        self.needs_reset = True

    def _not_realized(self) -> RuntimeError:
        return RuntimeError(f"{self.id} is not realized (plug it into a machine first)")

    def _backing(self) -> VirtioMemBacking:
        if self.backing is None:
            raise self._not_realized()
        return self.backing

    def _bits(self) -> PlugBitmap:
        if self.bitmap is None:
            raise self._not_realized()
        return self.bitmap

    def _policy(self) -> MemslotPolicy:
        if self.policy is None:
            raise self._not_realized()
        return self.policy

    @property
    def memslot_size(self) -> int:
        return self._policy().memslot_size

    @property
    def nb_memslots(self) -> int:
        """How many memslots the device maps now."""
        return self._policy().nb_mapped

    @property
    def mapped_memslots(self) -> frozenset[int]:
        """Grid indices of the memslots mapped now (single mode: {0})."""
        policy = self._policy()
        return frozenset(span.offset // policy.memslot_size for span in policy.mapped)


__all__ = ["VirtioMem", "VirtioMemProps", "VirtioMemPropertyError", "ProtectMode", "MemslotMode"]
