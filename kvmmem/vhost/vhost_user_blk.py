"""vhost-user-blk: a virtio block device whose queue a vhost-user back-end serves.

The device (virtio device id 2, VIRTIO 1.2 section 5.2) only negotiates and
relays: its features and configuration space come from the back-end
(GET_FEATURES, GET_CONFIG), and at DRIVER_OK it hands the back-end the ring
(SET_FEATURES, SET_VRING_NUM/BASE/ADDR/KICK/CALL/ENABLE), as QEMU's
``vhost_user_blk_start`` and ``vhost_dev_start`` do. Requests never pass
through Python: the guest's QueueNotify write signals a KVM ioeventfd that is
the back-end's kick fd, and the back-end's call fd is the transport's KVM
irqfd.

How the guest sees it (``kvmmem run ... -chardev socket,id=c0,path=SOCK
-device vhost-user-blk,chardev=c0,id=disk0``):

- a virtio-mmio version 2 window (``MMIO_SIZE`` 0x200 bytes) placed after
  the virtio-mem devices: base ``0xd0000000 + 0x1000 * n`` and GSI ``5 + n``,
  where ``n`` counts the virtio-mem devices before it (one virtio-mem
  device: 0xd0001000, GSI 6); announced on the kernel command line as
  ``virtio_mmio.device=512@0xd0001000:6``;
- DeviceID 2, VendorID "QEMU"; one queue (index 0), QueueNumMax 128;
- features: what the back-end offers among SIZE_MAX (1), SEG_MAX (2),
  GEOMETRY (4), RO (5), BLK_SIZE (6), FLUSH (9), TOPOLOGY (10),
  CONFIG_WCE (11), DISCARD (13), WRITE_ZEROES (14), RING_INDIRECT_DESC (28),
  RING_EVENT_IDX (29) and VERSION_1 (32, required); qemu-storage-daemon 7.2
  offers all of them but GEOMETRY and RO (RO when the export is read-only);
- configuration space: ``struct virtio_blk_config`` as the back-end reports
  it, 60 bytes (capacity in 512-byte sectors at offset 0, size_max at 8,
  seg_max at 12, blk_size at 20, writeback at 32, num_queues at 34, discard
  and write-zeroes limits from 36); only ``writeback`` is writable (with
  CONFIG_WCE), and is passed on with SET_CONFIG;
- InterruptStatus reads with bit 0 (used buffer) set while the back-end runs
  the queue: completions reach the guest as an irqfd edge the VMM never
  sees, so the driver must look at the used ring on every interrupt (Linux's
  virtio-mmio driver does: it only skips the rings when bit 0 is clear);
- if the back-end disconnects, the Status register shows DEVICE_NEEDS_RESET
  (0x40) and a configuration-change interrupt is raised; the VM runs on.

Guest memory must be shared (memfd): boot RAM through ``-object
memory-backend-memfd,id=ram,size=...`` and ``-machine memory-backend=ram``,
device memory through ``memory-backend-memfd`` or ``memory-backend-ram,share=on``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from kvmmem.devices.notifier import Notifier
from kvmmem.memory import AddressSpace, UnassignedAccessError
from kvmmem.vhost.frontend import BackendGone, VhostUserError, VhostUserFrontend
from kvmmem.vhost.messages import (
    F_PROTOCOL_FEATURES,
    ProtocolFeature,
    Request,
    VringAddr,
    pack_config,
    pack_u64,
    pack_vring_state,
    unpack_config,
    unpack_vring_state,
)
from kvmmem.virtio.device import VIRTIO_F_VERSION_1
from kvmmem.virtio.mmio_regs import QueueState

__all__ = [
    "BLK_CONFIG_SIZE",
    "SUPPORTED_FEATURES",
    "VIRTIO_ID_BLOCK",
    "VhostUserBlk",
    "VhostUserBlkProps",
]

log = logging.getLogger(__name__)

VIRTIO_ID_BLOCK = 2
BLK_CONFIG_SIZE = 60              # struct virtio_blk_config up to write_zeroes_may_unmap
WRITEBACK_OFFSET = 32             # virtio_blk_config.wce
QUEUE_SIZE = 128                  # QEMU's vhost-user-blk queue-size default
VIRTIO_BLK_F_CONFIG_WCE = 11
DRAIN_TIMEOUT = 30.0              # seconds a memslot change waits for requests in flight

SUPPORTED_FEATURES = (sum(1 << bit for bit in (1, 2, 4, 5, 6, 9, 10, 11, 13, 14, 28, 29))
                      | 1 << VIRTIO_F_VERSION_1)
"""Feature bits the device passes on from the back-end (QEMU's ``user_feature_bits``
for vhost-user-blk without MQ, packed rings and the IOMMU)."""


@dataclass(frozen=True)
class VhostUserBlkProps:
    """``-device vhost-user-blk,chardev=ID[,id=...][,num-queues=1][,queue-size=N]``."""

    id: str
    chardev: str
    path: str                     # the chardev's socket path
    num_queues: int = 1
    queue_size: int = QUEUE_SIZE
    reconnect: int = 0
    """Seconds between attempts to connect again after the back-end went (the
    chardev's ``reconnect=``, as QEMU 7.2 spells it); 0: never."""

    def __post_init__(self) -> None:
        if self.num_queues != 1:
            raise ValueError(f"vhost-user-blk '{self.id}': num-queues={self.num_queues}: "
                             "kvmmem's vhost-user-blk serves one queue")
        if not 0 < self.queue_size <= 1024 or self.queue_size & (self.queue_size - 1):
            raise ValueError(f"vhost-user-blk '{self.id}': queue-size={self.queue_size} is not "
                             "a power of two in 1..1024")


@dataclass(frozen=True)
class _Ring:
    """A ring the back-end serves: what restarting it needs, and where its indices are."""

    index: int
    num: int
    desc: int                     # guest-physical addresses, as the driver programmed them
    avail: int
    used: int

    def in_flight(self, space: AddressSpace) -> int:
        """Requests the driver made available that the device has not completed:
        ``avail->idx - used->idx`` (VIRTIO 1.2, 2.7.6 and 2.7.8), modulo 2^16."""
        return (space.read(self.avail + 2, 2) - space.read(self.used + 2, 2)) & 0xFFFF


class VhostUserBlk:
    """A virtio-blk device served by a connected vhost-user back-end (a VirtioDevice)."""

    device_id = VIRTIO_ID_BLOCK

    def __init__(self, props: VhostUserBlkProps, frontend: VhostUserFrontend,
                 address_space: AddressSpace) -> None:
        self.props = props
        self.id = props.id
        self.frontend = frontend
        self.address_space = address_space
        self.queue_max_sizes = (props.queue_size,) * props.num_queues
        self.needs_reset = False
        self.config_change_notifiers: Notifier[None] = Notifier()
        """The transport's observer; nothing notifies (no back-end config-change channel)."""
        self.started = False
        self._acked = 0
        self._rings: list[_Ring] = []
        self._fds: tuple[int, int] = (-1, -1)          # kick, call
        self.drain_timeout = DRAIN_TIMEOUT
        self.pauses: deque[float] = deque(maxlen=4096)
        """Seconds the back-end was stopped for each memslot change (most recent last)."""
        if not frontend.has(ProtocolFeature.CONFIG):
            raise VhostUserError(f"vhost-user-blk '{self.id}': the back-end does not offer the "
                                 "CONFIG protocol feature, which vhost-user-blk requires")
        if frontend.queue_num < props.num_queues:
            raise VhostUserError(f"vhost-user-blk '{self.id}': the back-end serves "
                                 f"{frontend.queue_num} queues, fewer than {props.num_queues}")
        _, config = frontend.query(Request.GET_CONFIG, unpack_config,
                                   pack_config(0, bytes(BLK_CONFIG_SIZE)))
        if len(config) != BLK_CONFIG_SIZE:
            raise VhostUserError(f"vhost-user-blk '{self.id}': GET_CONFIG answered "
                                 f"{len(config)} bytes instead of {BLK_CONFIG_SIZE}")
        self._config = bytearray(config)

    def attach(self, frontend: VhostUserFrontend) -> None:
        """A new connection after the back-end went (QEMU's ``vhost_user_blk_connect``):
        it must offer what the old one did, since the driver negotiated with that;
        the rings start again when the driver, told DEVICE_NEEDS_RESET, resets the
        device and sets DRIVER_OK."""
        if frontend.features != self.frontend.features or \
                frontend.protocol_features != self.frontend.protocol_features:
            raise VhostUserError(f"vhost-user-blk '{self.id}': the back-end came back with other "
                                 "features than it had")
        _, config = frontend.query(Request.GET_CONFIG, unpack_config,
                                   pack_config(0, bytes(BLK_CONFIG_SIZE)))
        if config[:8] != bytes(self._config[:8]):
            raise VhostUserError(f"vhost-user-blk '{self.id}': the back-end came back with "
                                 "another disk size")
        self.frontend = frontend
        self.started = False
        self._rings = []

    # -- the VirtioDevice protocol ---------------------------------------------

    @property
    def capacity(self) -> int:
        """The disk size in 512-byte sectors, from the configuration space."""
        return int.from_bytes(self._config[0:8], "little")

    def device_features(self) -> int:
        return self.frontend.features & SUPPORTED_FEATURES

    def set_driver_features(self, features: int) -> bool:
        self._acked = features
        return True

    def read_config(self, offset: int, size: int) -> bytes:
        if offset < 0 or size <= 0 or offset + size > len(self._config):
            raise ValueError(f"config access [{offset:#x}, +{size}) outside {len(self._config)} bytes")
        return bytes(self._config[offset:offset + size])

    def write_config(self, offset: int, data: bytes) -> None:
        if offset != WRITEBACK_OFFSET or len(data) != 1 or \
                not self._acked >> VIRTIO_BLK_F_CONFIG_WCE & 1:
            raise ValueError(f"config write at {offset:#x} of {len(data)} bytes: only writeback "
                             "is writable, with VIRTIO_BLK_F_CONFIG_WCE")
        try:
            self.frontend.request(Request.SET_CONFIG, pack_config(offset, data))
        except VhostUserError as exc:
            log.error("vhost-user-blk '%s': SET_CONFIG: %s", self.id, exc)
            raise ValueError(str(exc)) from None
        self._config[offset] = data[0]

    def handle(self, queue: int, request: bytes, response_capacity: int) -> bytes | None:
        """Never reached while the back-end serves the queue."""
        self.needs_reset = True
        return None

    def reset(self) -> None:
        """Stop the back-end's rings (QEMU's ``vhost_dev_stop``: disable, then GET_VRING_BASE)."""
        self.needs_reset = False
        self._acked = 0
        if not self.started:
            return
        self.started = False
        # Requests in flight finish first: a back-end told GET_VRING_BASE while
        # it still works on one may complete it into a ring it no longer owns
        # (qemu-storage-daemon 7.2 then panics writing the closed call fd).
        try:
            self._wait_idle()
        except VhostUserError as exc:
            log.error("vhost-user-blk '%s': reset: %s; stopping the back-end anyway", self.id, exc)
        try:
            self._stop_rings()
        except VhostUserError as exc:       # refused, or gone: the reset goes on (QEMU
            # logs a failed vhost_virtqueue_stop and finishes vhost_dev_stop)
            log.error("vhost-user-blk '%s': stopping the back-end failed: %s", self.id, exc)
        self._rings = []

    # -- starting the back-end ---------------------------------------------------

    def start(self, queues: Sequence[QueueState], kick_fd: int, call_fd: int) -> None:
        """DRIVER_OK: give the back-end the features and the rings (QEMU's ``vhost_dev_start``)."""
        features = self._acked & SUPPORTED_FEATURES
        if self._protocol_features_acked():
            features |= 1 << F_PROTOCOL_FEATURES
        # Every ring address is translated before anything is sent, so a bad
        # ring leaves the back-end untouched.
        rings = [_Ring(index, queue.num, queue.desc, queue.driver, queue.device)
                 for index, queue in enumerate(queues) if queue.ready]
        addrs = [self._vring_addr(ring) for ring in rings]
        self.frontend.request(Request.SET_FEATURES, pack_u64(features))
        self._rings, self._fds = rings, (kick_fd, call_fd)
        self._start_rings(addrs, [0] * len(rings))
        self.started = True

    def _vring_addr(self, ring: _Ring) -> VringAddr:
        return VringAddr(ring.index,
                         desc=self._host_address(ring.desc, 16 * ring.num, "descriptor table"),
                         used=self._host_address(ring.used, 6 + 8 * ring.num, "used ring"),
                         avail=self._host_address(ring.avail, 6 + 2 * ring.num, "available ring"))

    def _start_rings(self, addrs: list[VringAddr], bases: list[int]) -> None:
        """QEMU's ``vhost_virtqueue_start`` for each ring: size, base, addresses, fds, enable."""
        request = self.frontend.request
        kick_fd, call_fd = self._fds
        for ring, addr, base in zip(self._rings, addrs, bases, strict=True):
            request(Request.SET_VRING_NUM, pack_vring_state(ring.index, ring.num))
            request(Request.SET_VRING_BASE, pack_vring_state(ring.index, base))
            request(Request.SET_VRING_ADDR, addr.pack())
            request(Request.SET_VRING_KICK, pack_u64(ring.index), [kick_fd])
            request(Request.SET_VRING_CALL, pack_u64(ring.index), [call_fd])
            if self._protocol_features_acked():
                request(Request.SET_VRING_ENABLE, pack_vring_state(ring.index, 1))

    def _stop_rings(self) -> list[int]:
        """QEMU's ``vhost_virtqueue_stop``: disable, then GET_VRING_BASE (the next
        available index the back-end would have read); the bases, by ring."""
        bases = []
        for ring in self._rings:
            if self._protocol_features_acked():
                self.frontend.request(Request.SET_VRING_ENABLE, pack_vring_state(ring.index, 0))
            bases.append(self.frontend.query(Request.GET_VRING_BASE, unpack_vring_state,
                                             pack_vring_state(ring.index, 0))[1])
        return bases

    # -- memslot changes under a running back-end ---------------------------------

    @contextmanager
    def quiesced(self) -> Iterator[None]:
        """The back-end touches no guest memory inside this block (the vhost-user
        side of :meth:`AddressSpace.quiesced`; the vCPUs are stopped already).

        A request the back-end is working on holds pointers into its own
        mappings of guest memory, and REM_MEM_REG unmaps them under it: the
        I/O then fails (EFAULT) or, once ADD_MEM_REG maps something else there,
        reads or writes the wrong memory. So, as QEMU's ``vhost_dev_stop`` /
        ``vhost_dev_start`` around a memory change: kick the ring (a request the
        guest made available just before it was stopped), wait until every
        available request is used (``in_flight``), stop the rings, let the
        memory change happen, restart them at the base the back-end reported,
        with their addresses translated again. A back-end that does not finish
        within ``drain_timeout`` refuses the change (VhostUserError, nothing
        changed); one that has gone needs nothing."""
        if not self.started or not self.frontend.connected:
            yield
            return
        began = time.monotonic()
        self._wait_idle()
        try:
            bases = self._stop_rings()
        except BackendGone:
            yield
            return
        except VhostUserError:
            self._restart(None)
            raise
        try:
            yield
        finally:
            self._restart(bases)
            self.pauses.append(time.monotonic() - began)

    def _restart(self, bases: list[int] | None) -> None:
        """Start the rings again after a memory change (``bases`` None: at the
        indices the used rings show, after a stop that did not complete)."""
        try:
            if bases is None:
                bases = [self.address_space.read(r.used + 2, 2) for r in self._rings]
            self._start_rings([self._vring_addr(r) for r in self._rings], bases)
        except BackendGone:
            return
        except (VhostUserError, UnassignedAccessError) as exc:
            # Rings the back-end no longer serves: as a back-end that went, so
            # that the transport shows DEVICE_NEEDS_RESET and the VM runs on.
            log.error("vhost-user-blk '%s': restarting the back-end after a memory change "
                      "failed: %s", self.id, exc)
            self.frontend.fail(f"restarting the rings after a memory change failed: {exc}")

    def _wait_idle(self) -> None:
        """Until the back-end has completed every request the driver made available."""
        if not self._rings:
            return
        kick_fd = self._fds[0]
        if kick_fd >= 0:
            os.eventfd_write(kick_fd, 1)    # what the guest's QueueNotify would do
        deadline = time.monotonic() + self.drain_timeout
        delay = 50e-6
        while self.frontend.connected:
            try:
                busy = sum(ring.in_flight(self.address_space) for ring in self._rings)
            except UnassignedAccessError as exc:
                raise VhostUserError(f"vhost-user-blk '{self.id}': a ring is not in guest "
                                     f"memory any more: {exc}") from None
            if not busy:
                return
            if time.monotonic() > deadline:
                raise VhostUserError(f"vhost-user-blk '{self.id}': {busy} request(s) still in "
                                     f"flight after {self.drain_timeout:g} s")
            time.sleep(delay)
            delay = min(2 * delay, 1e-3)

    def _protocol_features_acked(self) -> bool:
        return bool(self.frontend.features >> F_PROTOCOL_FEATURES & 1)

    def _host_address(self, gpa: int, size: int, what: str) -> int:
        """The VMM's virtual address of a ring area, which must lie in one RAM range
        (ring addresses are front-end user addresses without VIRTIO_F_IOMMU_PLATFORM)."""
        fr = self.address_space.lookup(gpa)
        if fr is None or not fr.is_ram or gpa + size > fr.end:
            raise VhostUserError(f"vhost-user-blk '{self.id}': the {what} at [{gpa:#x}, "
                                 f"+{size:#x}) is not inside one RAM range")
        return fr.region.host_address(fr.offset + gpa - fr.start)

    def close(self) -> None:
        self.frontend.close()
