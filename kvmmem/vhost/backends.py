"""The vhost-user devices of one machine, and their place in the memslot budget.

A back-end maps guest memory itself and has its own memory-slot limit (32 in
the libvhost-user of QEMU 7.2, 509 later), usually far below KVM's. When a
vhost-user device is added, :class:`VhostBackends` connects to its back-end,
checks that all guest memory is shared, refuses the back-end if it cannot
hold the RAM ranges mapped now plus the memslots memory devices have
reserved (QEMU's ``vhost_dev_init``, from the separate-memslots RFC's patch "vhost: Respect
reserved memslots for memory devices when realizing a vhost device"), then
attaches its memory listener and registers it with the budget as a consumer,
so that later memory devices get their memslot count from the minimum over
KVM and every back-end.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from kvmmem.devices.memory_device import MemslotBudgetError
from kvmmem.devices.memslot_budget import MemslotBudget
from kvmmem.memory import AddressSpace, HostMemory
from kvmmem.memory.guest_memory import GuestMemory
from kvmmem.vhost.frontend import VhostUserError, VhostUserFrontend
from kvmmem.vhost.mem_listener import VhostMemoryListener
from kvmmem.vhost.mmio import VhostMmioTransport
from kvmmem.vhost.vhost_user_blk import VhostUserBlk, VhostUserBlkProps

if TYPE_CHECKING:
    from kvmmem.kvm import Vm

__all__ = ["MachineMemoryView", "MemoryDeviceView", "UnsharedMemoryError", "VhostBackend",
           "VhostBackends", "require_shared"]

log = logging.getLogger(__name__)


class UnsharedMemoryError(VhostUserError):
    """Guest memory a vhost-user back-end cannot map: the machine's
    configuration is at fault (``kvmmem run`` names the -device), not the host."""


def require_shared(host: HostMemory, what: str, device: str) -> None:
    """Refuse memory a vhost-user back-end could not map (no memfd behind it)."""
    if host.fd < 0:
        raise UnsharedMemoryError(
            f"vhost-user-blk '{device}': {what} '{host.name}' is not shared memory, so the "
            f"vhost-user back-end cannot map it; use memory-backend-memfd or "
            f"memory-backend-ram,share=on (boot RAM: -object memory-backend-memfd,id=ID,"
            f"size=SIZE -machine memory-backend=ID)")


class MemoryDeviceView(Protocol):
    """What the vhost-user devices read of a memory device: its id and its memdev."""

    @property
    def id(self) -> str: ...

    @property
    def memdev(self) -> HostMemory: ...


class MachineMemoryView(Protocol):
    """What the vhost-user devices need of the machine's memory (the VMM's
    ``MachineMemory`` is one): the boot RAM and the memory devices, to check that
    a back-end can map them; the address space its listener follows; the budget
    it joins as a memslot consumer."""

    @property
    def ram_host(self) -> HostMemory: ...

    @property
    def devices(self) -> Mapping[str, MemoryDeviceView]: ...

    @property
    def address_space(self) -> AddressSpace: ...

    @property
    def budget(self) -> MemslotBudget: ...


@dataclass
class VhostBackend:
    """One vhost-user device: its connection, memory listener, device and transport."""

    props: VhostUserBlkProps
    frontend: VhostUserFrontend
    listener: VhostMemoryListener
    device: VhostUserBlk
    transport: VhostMmioTransport | None = None

    @property
    def consumer(self) -> str:
        return f"vhost-user-blk:{self.props.id}"


class VhostBackends:
    """The vhost-user devices of a machine's memory."""

    def __init__(self, memory: MachineMemoryView, vm: Vm, guest_memory: GuestMemory) -> None:
        self.memory = memory
        self.vm = vm
        self.guest_memory = guest_memory
        self.devices: dict[str, VhostBackend] = {}

    def connect(self, props: VhostUserBlkProps) -> VhostBackend:
        """Connect to the back-end and mirror guest memory to it; refused (nothing
        changed, the connection closed) when memory is not shared or slots are short."""
        if props.id in self.devices:
            raise VhostUserError(f"a vhost-user device with id '{props.id}' already exists")
        memory = self.memory
        require_shared(memory.ram_host, "guest RAM", props.id)
        for dev in memory.devices.values():
            require_shared(dev.memdev, f"memory device '{dev.id}' memdev", props.id)
        frontend = VhostUserFrontend(props.path, f"vhost-user-blk:{props.id}")
        try:
            listener = VhostMemoryListener(frontend)
            self._check_slots(listener, props.id)
            device = VhostUserBlk(props, frontend, memory.address_space)
            listener.quiesce_queues = device.quiesced
            memory.address_space.add_listener(listener)
            backend = VhostBackend(props, frontend, listener, device)
            try:
                memory.budget.add_consumer(backend.consumer, listener.free)
            except BaseException:
                memory.address_space.remove_listener(listener)
                raise
        except BaseException:
            frontend.close()
            raise
        self.devices[props.id] = backend
        frontend.on_disconnect.append(lambda reason: self._drop_consumer(backend))
        if not frontend.connected:         # gone before the callback was there
            self._drop_consumer(backend)
        return backend

    def reconnect(self, dev_id: str) -> bool:
        """Connect a device whose back-end went to a back-end at the same path
        again (QEMU's chardev ``reconnect=``): the same checks as :meth:`connect`,
        a new memory listener in place of the inert old one, the budget
        consumer back. False, nothing changed, while the back-end is not there
        (or still connected); VhostUserError if it came back unfit."""
        backend = self.devices[dev_id]
        if backend.frontend.connected:
            return False
        memory = self.memory
        try:
            frontend = VhostUserFrontend(backend.props.path, backend.consumer)
        except VhostUserError as exc:
            log.debug("%s: not back yet: %s", backend.consumer, exc)
            return False
        space = memory.address_space
        with ExitStack() as undo:                   # unwound, latest first, on a failure
            undo.callback(frontend.close)
            listener = VhostMemoryListener(frontend)
            self._check_slots(listener, dev_id)
            space.remove_listener(backend.listener)           # inert since it went
            undo.callback(space.add_listener, backend.listener)
            space.add_listener(listener)
            undo.callback(space.remove_listener, listener)
            memory.budget.add_consumer(backend.consumer, listener.free)
            undo.callback(memory.budget.remove_consumer, backend.consumer)
            backend.device.attach(frontend)
            undo.pop_all()
        listener.quiesce_queues = backend.device.quiesced
        backend.frontend.close()
        backend.frontend, backend.listener = frontend, listener
        frontend.on_disconnect.append(lambda reason: self._drop_consumer(backend))
        if not frontend.connected:         # gone again before the callback was there
            self._drop_consumer(backend)
        if backend.transport is not None:
            backend.transport.reconnected()
        log.info("%s: reconnected to the vhost-user back-end at %s", backend.consumer,
                 backend.props.path)
        return True

    def _check_slots(self, listener: VhostMemoryListener, dev_id: str) -> None:
        """QEMU's ``vhost_dev_init`` check: the back-end holds the RAM ranges
        mapped now and the memslots memory devices keep reserved."""
        used = sum(1 for fr in self.memory.address_space.flatview if fr.is_ram)
        reserved = self.memory.budget.outstanding
        if listener.limit < used + reserved:
            raise VhostUserError(
                f"vhost-user-blk '{dev_id}': vhost backend memory slots limit "
                f"({listener.limit}) is less than current number of used ({used}) and "
                f"reserved ({reserved}) memory slots for memory devices")

    def _drop_consumer(self, backend: VhostBackend) -> None:
        """A back-end that disconnected no longer limits the free memslots: QEMU's
        vhost_user_blk_disconnect() ends in vhost_dev_cleanup(), which takes the
        device off the list vhost_get_free_memslots() looks at (its listener is
        inert from then on, see VhostMemoryListener). Called from the watcher
        thread or a failing request; the budget reads its consumers from a copy."""
        try:
            self.memory.budget.remove_consumer(backend.consumer)
        except MemslotBudgetError:
            pass                           # already dropped (the device was removed)

    def check_memory_device(self, memdev: HostMemory | None, device: str) -> None:
        """A memory device plugged next to vhost-user devices must be shared too."""
        if memdev is None:
            if self.devices:
                raise UnsharedMemoryError(f"memory device '{device}' has no memdev, so its memory is "
                                          f"not shared; vhost-user devices need memory-backend-memfd")
            return
        for backend in self.devices.values():
            require_shared(memdev, f"memory device '{device}' memdev", backend.props.id)

    def realize(self, dev_id: str, base: int, gsi: int) -> VhostMmioTransport:
        """Put the device behind a virtio-mmio window at ``base`` with interrupt ``gsi``."""
        backend = self.devices[dev_id]
        transport = VhostMmioTransport(backend.device, self.guest_memory, self.vm, gsi,
                                       base=base, name=f"virtio-mmio-{dev_id}")
        backend.transport = transport
        return transport

    def remove(self, dev_id: str) -> None:
        """Disconnect a device: its listener and budget entry go, the back-end is closed."""
        backend = self.devices.pop(dev_id)
        if backend.transport is not None:
            backend.transport.close()
        self._drop_consumer(backend)
        self.memory.address_space.remove_listener(backend.listener)
        backend.frontend.close()

    def close(self) -> None:
        for dev_id in list(self.devices):
            self.remove(dev_id)

    def consumers(self) -> list[dict[str, Any]]:
        """QMP ``x-query-memslot-consumers``: each memslot consumer's limit and use
        (KVM first, then every connected back-end: one that disconnected is no
        consumer any more) and what memory devices keep reserved."""
        vm, budget = self.vm, self.memory.budget
        reserved = budget.outstanding
        result: list[dict[str, Any]] = [{"consumer": "kvm", "limit": vm.max_memslots,
                                         "used": vm.used_memslots, "free": vm.free_memslots,
                                         "reserved": reserved}]
        counted = set(budget.consumers)
        for backend in self.devices.values():
            if backend.consumer not in counted:
                continue
            listener = backend.listener
            entry: dict[str, Any] = {"consumer": backend.consumer, "limit": listener.limit,
                                     "used": listener.used, "free": listener.free(),
                                     "reserved": reserved,
                                     "connected": backend.frontend.connected}
            result.append(entry)
        return result
