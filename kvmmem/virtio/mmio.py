"""The virtio-mmio transport, version 2 (VIRTIO 1.2, section 4.2).

:class:`VirtioMmioTransport` is the register file of one device: a 0x200-byte
I/O :class:`~kvmmem.memory.MemoryRegion` (``.region``) that the machine maps
into the system address space, whose callbacks negotiate features, run the
status handshake, set up split virtqueues and serve them.

Notifications.  A write to QueueNotify that exits to the VMM (an MMIO exit
dispatched through the address space) serves the queue at once, in the
vCPU thread.  With :meth:`attach_ioeventfd` KVM instead signals an eventfd
(:attr:`notify_fd`) on such writes and the vCPU keeps running; the VMM's
event loop waits for the fd to become readable (``select``/``poll``/
``selectors``) and then calls :meth:`poll_notifications`, which serves every
ready queue.  Both paths may be used from different threads: one re-entrant
lock serialises register accesses, queue processing and device callbacks.

Interrupts.  InterruptStatus bit 0 (used buffer) and bit 1 (configuration
change) are set, and the interrupt is signalled: through an irqfd on ``gsi``
(an eventfd registered with ``Vm.irqfd``; every signal is an edge) when a
``vm`` is given, else through the ``interrupt`` callback.  InterruptACK
clears bits.  As the specification asks, configuration change interrupts
are only sent once the driver has set DRIVER_OK.

Guest errors.  A bad queue size, queue areas or buffers outside RAM, a
malformed chain, a device refusing a request: the transport sets
DEVICE_NEEDS_RESET (Status bit 0x40), raises a configuration change
interrupt (at DRIVER_OK, if it happened before), stops serving queues and
keeps answering register accesses; writing 0 to Status recovers.  Accesses
of the wrong size or alignment and writes to read-only registers are
ignored and counted in :attr:`stats`.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvmmem.memory import MemoryRegion
from kvmmem.memory.guest_memory import GuestMemory
from kvmmem.virtio.device import VIRTIO_F_VERSION_1, VirtioDevice
from kvmmem.virtio.eventfds import IrqFd, NotifyFd
from kvmmem.virtio.mmio_regs import (
    CONFIG_OFFSET,
    INT_CONFIG_CHANGE,
    INT_USED_BUFFER,
    MAGIC_VALUE,
    MMIO_SIZE,
    QUEUE_ADDRESS,
    READ_ONLY,
    VENDOR_ID,
    VERSION,
    WRITE_ONLY,
    QueueState,
    Reg,
    Status,
)
from kvmmem.virtio.queue import MAX_QUEUE_SIZE, QueueViolation, SplitQueue

if TYPE_CHECKING:
    from kvmmem.kvm import Vm

__all__ = ["VirtioMmioTransport", "Reg", "Status", "QueueState", "MAGIC_VALUE", "VERSION",
           "VENDOR_ID", "MMIO_SIZE", "CONFIG_OFFSET", "INT_USED_BUFFER", "INT_CONFIG_CHANGE"]

log = logging.getLogger(__name__)

_U32 = 0xFFFF_FFFF
_FEATURES_OK = int(Status.FEATURES_OK)
_DRIVER_OK = int(Status.DRIVER_OK)
_NEEDS_RESET = int(Status.DEVICE_NEEDS_RESET)


class VirtioMmioTransport:
    """One virtio device behind a virtio-mmio version 2 register window.

    ``base`` is where the machine maps :attr:`region` (needed for the
    ioeventfd and the kernel command line).  ``vm`` and ``gsi`` route
    interrupts through an irqfd (the VM needs its irqchip already);
    without ``vm``, ``interrupt(bits)`` is called with the InterruptStatus
    bits just raised.
    """

    def __init__(self, device: VirtioDevice, guest_memory: GuestMemory, vm: Vm | None = None,
                 gsi: int | None = None, *, base: int | None = None, name: str = "virtio-mmio",
                 interrupt: Callable[[int], None] | None = None) -> None:
        if not isinstance(guest_memory, GuestMemory):
            raise TypeError(f"guest_memory must be a GuestMemory, not "
                            f"{type(guest_memory).__name__}")
        sizes = tuple(device.queue_max_sizes)
        for size in sizes:
            if not isinstance(size, int) or not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
                raise ValueError(f"device queue size {size!r} is not a power of two "
                                 f"in 1..{MAX_QUEUE_SIZE}")
        if vm is not None and gsi is None:
            raise ValueError("interrupts through an irqfd need the device's gsi")
        if base is not None and (base < 0 or base % 4):
            raise ValueError(f"base {base:#x} must be a non-negative, 4-byte aligned address")
        self.device = device
        self.memory = guest_memory
        self.vm = vm
        self.gsi = gsi
        self.base = base
        self.name = name
        self.stats: Counter[str] = Counter()
        """Ignored accesses, violations, interrupts, resets, ... by reason."""
        self.last_violation: str | None = None
        self.region = MemoryRegion.io(name, MMIO_SIZE, read=self.read, write=self.write)
        self._lock = threading.RLock()
        self._interrupt = interrupt
        self._queues = tuple(QueueState(size) for size in sizes)
        self._status = 0
        self._needs_reset = False
        self._interrupt_status = 0
        self._config_generation = 0
        self._device_features_sel = 0
        self._driver_features_sel = 0
        self._driver_features = 0
        self._driver_features_invalid = False
        self._queue_sel = 0
        self._notify_event: NotifyFd | None = None
        self._irq = IrqFd(vm, gsi) if vm is not None and gsi is not None else None
        # Observe the device's config changes (it never knows its transport).
        device.config_change_notifiers.add(self._device_config_changed)

    # -- state, for the VMM and tests ---------------------------------------------

    @property
    def status(self) -> int:
        """The Status register as the driver reads it."""
        return self._status | (_NEEDS_RESET if self._needs_reset else 0)

    @property
    def needs_reset(self) -> bool:
        return self._needs_reset

    @property
    def interrupt_status(self) -> int:
        return self._interrupt_status

    @property
    def driver_features(self) -> int:
        """The features the driver wrote (accepted once Status has FEATURES_OK)."""
        return self._driver_features

    @property
    def queues(self) -> tuple[QueueState, ...]:
        return self._queues

    @property
    def notify_fd(self) -> int | None:
        """The QueueNotify eventfd after :meth:`attach_ioeventfd`, else None."""
        return self._notify_event.fd if self._notify_event is not None else None

    @property
    def irq_fd(self) -> int | None:
        """The irqfd's eventfd when interrupts go through KVM, else None."""
        return self._irq.fd if self._irq is not None else None

    def linux_cmdline(self) -> str:
        """This device in Linux's ``virtio_mmio.device=<size>@<base>:<irq>`` syntax."""
        if self.base is None or self.gsi is None:
            raise ValueError(f"{self.name}: base and gsi are needed for the command line")
        return f"virtio_mmio.device={MMIO_SIZE}@{self.base:#x}:{self.gsi}"

    # -- the register file (the region's callbacks) -----------------------------------

    def read(self, offset: int, size: int) -> int:
        """A driver read of ``size`` bytes at ``offset`` in the window."""
        with self._lock:
            if offset >= CONFIG_OFFSET:
                return self._read_config(offset - CONFIG_OFFSET, size)
            if size != 4 or offset % 4:
                self.stats["bad_register_access"] += 1
                return 0
            try:
                reg = Reg(offset)
            except ValueError:
                self.stats["unknown_register"] += 1
                return 0
            if reg in WRITE_ONLY:
                self.stats["read_of_write_only"] += 1
                return 0
            return self._read_register(reg) & _U32

    def write(self, offset: int, size: int, value: int) -> None:
        """A driver write of ``size`` bytes at ``offset`` in the window."""
        with self._lock:
            if offset >= CONFIG_OFFSET:
                self._write_config(offset - CONFIG_OFFSET, size, value)
                return
            if size != 4 or offset % 4:
                self.stats["bad_register_access"] += 1
                return
            try:
                reg = Reg(offset)
            except ValueError:
                self.stats["unknown_register"] += 1
                return
            if reg in READ_ONLY:
                self.stats["write_to_read_only"] += 1
                return
            self._write_register(reg, int(value) & _U32)

    def _read_register(self, reg: Reg) -> int:
        queue = self._selected_queue()
        if reg is Reg.MAGIC_VALUE:
            return MAGIC_VALUE
        if reg is Reg.VERSION:
            return VERSION
        if reg is Reg.DEVICE_ID:
            return self.device.device_id
        if reg is Reg.VENDOR_ID:
            return VENDOR_ID
        if reg is Reg.DEVICE_FEATURES:
            sel = self._device_features_sel
            return self._offered_features() >> (32 * sel) if sel < 2 else 0
        if reg is Reg.QUEUE_NUM_MAX:
            return queue.max_size if queue is not None else 0
        if reg is Reg.QUEUE_READY:
            return int(queue is not None and queue.ready)
        if reg is Reg.INTERRUPT_STATUS:
            return self._interrupt_status
        if reg is Reg.STATUS:
            return self.status
        if reg in (Reg.SHM_LEN_LOW, Reg.SHM_LEN_HIGH, Reg.SHM_BASE_LOW, Reg.SHM_BASE_HIGH):
            return _U32                      # no shared memory regions: length -1
        if reg is Reg.CONFIG_GENERATION:
            return self._config_generation
        return 0                             # QueueReset: VIRTIO_F_RING_RESET not offered

    def _write_register(self, reg: Reg, value: int) -> None:
        if reg is Reg.STATUS:
            self._write_status(value)
        elif reg is Reg.QUEUE_NOTIFY:
            self._notify(value & 0xFFFF)     # no VIRTIO_F_NOTIFICATION_DATA: the index
        elif reg is Reg.INTERRUPT_ACK:
            self._interrupt_status &= ~value
        elif reg is Reg.DEVICE_FEATURES_SEL:
            self._device_features_sel = value
        elif reg is Reg.DRIVER_FEATURES_SEL:
            self._driver_features_sel = value
        elif reg is Reg.DRIVER_FEATURES:
            self._write_driver_features(value)
        elif reg is Reg.QUEUE_SEL:
            self._queue_sel = value
        elif reg is Reg.QUEUE_NUM:
            self._write_queue_num(value)
        elif reg is Reg.QUEUE_READY:
            self._write_queue_ready(value)
        elif reg in QUEUE_ADDRESS:
            self._write_queue_address(reg, value)
        else:                                # SHMSel, QueueReset: nothing to select or reset
            self.stats["ignored_write"] += 1

    # -- features and status -------------------------------------------------------

    def _offered_features(self) -> int:
        return (self.device.device_features() | (1 << VIRTIO_F_VERSION_1)) & ((1 << 64) - 1)

    def _write_driver_features(self, value: int) -> None:
        if self._status & _FEATURES_OK:
            self.stats["features_after_features_ok"] += 1
            return
        sel = self._driver_features_sel
        if sel < 2:
            shift = 32 * sel
            self._driver_features = (self._driver_features & ~(_U32 << shift)) | (value << shift)
        elif value:
            self._driver_features_invalid = True   # bits beyond 63 were never offered

    def _negotiate(self) -> bool:
        """FEATURES_OK was written: may the features the driver chose stand?"""
        features = self._driver_features
        unoffered = features & ~self._offered_features()
        if self._driver_features_invalid or unoffered:
            self.stats["features_refused"] += 1
            log.info("%s: driver accepted features never offered (%#x)", self.name, unoffered)
            return False
        if not features >> VIRTIO_F_VERSION_1 & 1:
            self.stats["features_refused"] += 1
            log.info("%s: driver did not accept VIRTIO_F_VERSION_1", self.name)
            return False
        if not self.device.set_driver_features(features):
            self.stats["features_refused"] += 1
            return False
        return True

    def _write_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self.reset()
            return
        old = self._status
        if old & ~value:
            self.stats["status_bits_cleared"] += 1     # bits stay set until a reset
        new = (value & ~old) & ~_NEEDS_RESET
        if new & _FEATURES_OK and not self._negotiate():
            new &= ~_FEATURES_OK
        if new & _DRIVER_OK and not (old | new) & _FEATURES_OK:
            new &= ~_DRIVER_OK
            self._violation("DRIVER_OK set without FEATURES_OK")
        self._status = old | new
        if new & _DRIVER_OK:
            if self._needs_reset:
                self._raise_interrupt(INT_CONFIG_CHANGE)   # held back until now
            else:
                for index, queue in enumerate(self._queues):
                    if queue.ready:
                        self._process(index)

    def reset(self) -> None:
        """Device reset, as when the driver writes 0 to Status."""
        with self._lock:
            self.device.reset()
            self._status = 0
            self._needs_reset = False
            self._interrupt_status = 0
            self._device_features_sel = self._driver_features_sel = self._queue_sel = 0
            self._driver_features = 0
            self._driver_features_invalid = False
            for queue in self._queues:
                queue.reset()
            self.stats["resets"] += 1

    # -- queue setup ------------------------------------------------------------------

    def _selected_queue(self) -> QueueState | None:
        sel = self._queue_sel
        return self._queues[sel] if sel < len(self._queues) else None

    def _setup_queue(self) -> QueueState | None:
        """The selected queue if its setup registers may be written now."""
        queue = self._selected_queue()
        if queue is None:
            self.stats["no_such_queue"] += 1
        elif queue.ready:
            self.stats["setup_of_ready_queue"] += 1
            return None
        return queue

    def _write_queue_num(self, value: int) -> None:
        queue = self._setup_queue()
        if queue is None:
            return
        if not 0 < value <= queue.max_size or value & (value - 1):
            self._violation(f"queue {self._queue_sel}: QueueNum {value} is not a power of "
                            f"two in 1..{queue.max_size}")
            return
        queue.num = value

    def _write_queue_address(self, reg: Reg, value: int) -> None:
        queue = self._setup_queue()
        if queue is None:
            return
        name, shift = QUEUE_ADDRESS[reg]
        old = getattr(queue, name)
        setattr(queue, name, (old & ~(_U32 << shift)) | (value << shift))

    def _write_queue_ready(self, value: int) -> None:
        queue = self._selected_queue()
        if queue is None:
            self.stats["no_such_queue"] += 1
            return
        if not value & 1:
            queue.ring = None
            return
        if queue.ready:
            return
        if self._needs_reset:
            self.stats["ready_while_needs_reset"] += 1     # e.g. after a bad QueueNum
            return
        try:
            queue.ring = SplitQueue(self.memory, queue.num, queue.desc, queue.driver,
                                    queue.device, max_size=queue.max_size)
        except QueueViolation as exc:
            self._violation(f"queue {self._queue_sel}: {exc}")

    # -- snapshot ------------------------------------------------------------------

    def save_state(self) -> dict[str, Any]:
        """The register file and each queue (addresses, size, ring indices), for a
        snapshot: numbers only, checked again by :meth:`load_state`."""
        with self._lock:
            return {
                "status": self._status, "needs_reset": self._needs_reset,
                "interrupt_status": self._interrupt_status,
                "config_generation": self._config_generation,
                "device_features_sel": self._device_features_sel,
                "driver_features_sel": self._driver_features_sel,
                "driver_features": self._driver_features,
                "driver_features_invalid": self._driver_features_invalid,
                "queue_sel": self._queue_sel,
                "queues": [{"num": q.num, "desc": q.desc, "driver": q.driver, "device": q.device,
                            "ready": q.ready,
                            "next_avail": q.ring.next_avail if q.ring else 0,
                            "next_used": q.ring.next_used if q.ring else 0}
                           for q in self._queues]}

    def load_state(self, state: dict[str, Any]) -> None:
        """The state :meth:`save_state` gave, into a transport of the same device;
        a ring the saved addresses do not allow is refused (ValueError)."""
        queues = state["queues"]
        if len(queues) != len(self._queues):
            raise ValueError(f"{self.name}: {len(queues)} queues in the state, "
                             f"{len(self._queues)} here")
        rings: list[SplitQueue | None] = []
        for q, saved in zip(self._queues, queues, strict=True):
            if not saved["ready"]:
                rings.append(None)
                continue
            try:
                rings.append(SplitQueue(self.memory, saved["num"], saved["desc"], saved["driver"],
                                        saved["device"], max_size=q.max_size,
                                        next_avail=saved["next_avail"],
                                        next_used=saved["next_used"]))
            except QueueViolation as exc:
                raise ValueError(f"{self.name}: {exc}") from None
        with self._lock:
            for q, saved, ring in zip(self._queues, queues, rings, strict=True):
                q.num, q.desc, q.driver, q.device = (saved["num"], saved["desc"], saved["driver"],
                                                     saved["device"])
                q.ring = ring
            self._status = state["status"]
            self._needs_reset = state["needs_reset"]
            self._interrupt_status = state["interrupt_status"]
            self._config_generation = state["config_generation"]
            self._device_features_sel = state["device_features_sel"]
            self._driver_features_sel = state["driver_features_sel"]
            self._driver_features = state["driver_features"]
            self._driver_features_invalid = state["driver_features_invalid"]
            self._queue_sel = state["queue_sel"]

    # -- notifications --------------------------------------------------------------------

    def notify(self, index: int) -> None:
        """Serve queue ``index`` as if the driver had written it to QueueNotify."""
        with self._lock:
            self._notify(index)

    def _notify(self, index: int) -> None:
        if index >= len(self._queues) or not self._queues[index].ready:
            self.stats["notify_of_idle_queue"] += 1
        elif self._needs_reset:
            self.stats["notify_while_needs_reset"] += 1
        elif not self._status & _DRIVER_OK:
            self.stats["notify_before_driver_ok"] += 1     # served at DRIVER_OK
        else:
            self._process(index)

    def _process(self, index: int) -> None:
        """Serve the available chains of a ready queue, then interrupt once."""
        ring = self._queues[index].ring
        assert ring is not None
        served = 0
        try:
            # At most one ring's worth per call, so a driver refilling the ring
            # from another vCPU cannot keep this thread here; it notifies again.
            for _ in range(ring.size):
                chain = ring.pop()
                if chain is None:
                    break
                request = ring.read_request(chain)
                capacity = chain.writable_length
                try:
                    response = self.device.handle(index, request, capacity)
                except Exception:
                    log.exception("%s: device failed on a request of queue %d", self.name, index)
                    self._violation(f"queue {index}: device error on chain {chain.head}")
                    break
                if response is None or self.device.needs_reset:
                    self._violation(f"queue {index}: device refused chain {chain.head}")
                    break
                if len(response) > capacity:
                    log.error("%s: device answered %d bytes into %d writable",
                              self.name, len(response), capacity)
                    self._violation(f"queue {index}: response larger than the chain's "
                                    "writable buffers")
                    break
                ring.push(chain.head, ring.write_response(chain, response))
                served += 1
        except QueueViolation as exc:
            self._violation(f"queue {index}: {exc}")
        if served:
            self.stats["chains_served"] += served
            self._raise_interrupt(INT_USED_BUFFER)

    def attach_ioeventfd(self) -> int:
        """Let KVM signal QueueNotify writes on an eventfd instead of exiting.

        Registers a 4-byte ioeventfd at ``base + 0x50`` (any value matches)
        and returns its fd, also :attr:`notify_fd`; the VMM then calls
        :meth:`poll_notifications` whenever that fd is readable.
        """
        with self._lock:
            if self._notify_event is None:
                if self.vm is None or self.base is None:
                    raise ValueError(f"{self.name}: an ioeventfd needs the vm and the base address")
                self._notify_event = NotifyFd(self.vm, self.base + Reg.QUEUE_NOTIFY)
            return self._notify_event.fd

    def detach_ioeventfd(self) -> None:
        """Undo :meth:`attach_ioeventfd` (QueueNotify writes exit again)."""
        with self._lock:
            notify, self._notify_event = self._notify_event, None
            if notify is not None:
                notify.close()

    def poll_notifications(self) -> int:
        """Consume the ioeventfd's count and serve every ready queue if it was
        signalled; returns the number of notifications (0: none pending)."""
        notify = self._notify_event
        count = notify.consume() if notify is not None else 0
        if not count:
            return 0
        with self._lock:
            for index, queue in enumerate(self._queues):
                if queue.ready:
                    self._notify(index)
        return count

    # -- configuration space -------------------------------------------------------------

    def _read_config(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4, 8) or offset % min(size, 4):
            self.stats["bad_config_access"] += 1
            return 0
        try:
            data = self.device.read_config(offset, size)
        except ValueError:
            self.stats["bad_config_access"] += 1
            return 0
        if len(data) != size:
            self.stats["bad_config_access"] += 1
            return 0
        return int.from_bytes(data, "little")

    def _write_config(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4, 8) or offset % min(size, 4):
            self.stats["bad_config_access"] += 1
            return
        try:
            self.device.write_config(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        except ValueError:
            self.stats["bad_config_access"] += 1

    def _device_config_changed(self, _: None = None) -> None:
        with self._lock:
            self._config_generation = (self._config_generation + 1) & _U32
            if self._status & _DRIVER_OK:
                self._raise_interrupt(INT_CONFIG_CHANGE)

    # -- errors and interrupts --------------------------------------------------------------

    def _violation(self, reason: str) -> None:
        """The driver broke the protocol: DEVICE_NEEDS_RESET until a reset."""
        self.stats["violations"] += 1
        self.last_violation = reason
        log.warning("%s: DEVICE_NEEDS_RESET: %s", self.name, reason)
        if self._needs_reset:
            return
        self._needs_reset = True
        if self._status & _DRIVER_OK:
            self._raise_interrupt(INT_CONFIG_CHANGE)

    def _raise_interrupt(self, bits: int) -> None:
        self._interrupt_status |= bits
        self.stats["interrupts"] += 1
        if self._irq is not None:
            self._irq.signal()
        elif self._interrupt is not None:
            self._interrupt(bits)

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Unregister the eventfds from KVM and close them."""
        with self._lock:
            self.detach_ioeventfd()
            irq, self._irq = self._irq, None
            if irq is not None:
                irq.close()
            if self._device_config_changed in self.device.config_change_notifiers:
                self.device.config_change_notifiers.remove(self._device_config_changed)

    def __enter__(self) -> VirtioMmioTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        base = f"{self.base:#x}" if self.base is not None else "unmapped"
        return f"<VirtioMmioTransport {self.name!r} @{base} status={self.status:#x}>"
