"""Guest-physical memory of a pc-like machine under KVM.

Builds QEMU's pc layout as a region tree (``system`` with ``ram-below-4g``
and ``ram-above-4g`` aliases of ``pc.ram`` and the ``device-memory``
container), renders it through one address space whose KVM listener keeps
the VM's memslots equal to its RAM ranges, and plugs memory devices into
the device-memory area with the memslots they may need reserved first.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmmem.devices.memory_device import DeviceMemory, MemoryDeviceError
from kvmmem.devices.memslot_budget import MemoryDeviceListener, MemslotBudget, MemslotSplit, memslots_for_device
from kvmmem.devices.memslot_policy import MemslotMode
from kvmmem.devices.virtio_mem import VirtioMem
from kvmmem.kvm import Vm
from kvmmem.memory import AddressSpace, HostMemory, KvmMemoryListener, MemoryRegion, memory_transaction, mtree_info
from kvmmem.vmm.memslot_metadata import default_limit, device_estimate, refusal
from kvmmem.vmm.pc_layout import MachineMemoryMap

SYSTEM_SIZE = 1 << 64


@dataclass(frozen=True)
class DeviceMemslot:
    """One memslot of a memory device as the user sees it."""

    index: int
    guest_phys_addr: int
    size: int
    mapped: bool
    kvm_slot: int | None


class MachineMemory:
    """Boot RAM, device memory and memory devices of one VM."""

    def __init__(self, vm: Vm, ram_size: int, maxmem: int | None = None, slots: int = 0,
                 metadata_limit: int | None = None, ram_host: HostMemory | None = None) -> None:
        """``ram_host`` backs boot RAM (QEMU's ``-machine memory-backend=ID``; shared
        for vhost-user); without it boot RAM is private anonymous memory."""
        if ram_host is not None and ram_host.size != ram_size:
            raise MemoryDeviceError(f"the RAM size {ram_size:#x} does not match the size "
                                    f"{ram_host.size:#x} of memory backend '{ram_host.name}'")
        self.vm = vm
        self.metadata_limit = default_limit() if metadata_limit is None else metadata_limit
        """Bytes of KVM memslot metadata all memory devices may cost
        (estimated, see :mod:`kvmmem.vmm.memslot_metadata`)."""
        self.layout = MachineMemoryMap(ram_size, maxmem, slots)
        self.budget = MemslotBudget({"kvm": lambda: vm.free_memslots})
        self.device_memory = DeviceMemory(self.layout.device_memory)
        self.ram_host = ram_host or HostMemory(ram_size, "pc.ram")
        self.system = MemoryRegion.container("system", SYSTEM_SIZE)
        self.pc_ram = MemoryRegion.ram("pc.ram", self.ram_host)
        self.devices: dict[str, VirtioMem] = {}
        boot_ram = self.layout.boot_ram()
        self.budget.check_available("boot RAM", len(boot_ram))
        with memory_transaction():
            for piece in boot_ram:
                r = piece.range
                self.system.add_subregion(
                    r.start, MemoryRegion.alias(r.name, self.pc_ram, piece.ram_offset, r.size))
            area = self.layout.device_memory
            self.device_memory_region = None
            if area is not None:
                self.device_memory_region = MemoryRegion.container("device-memory", area.size)
                self.system.add_subregion(area.start, self.device_memory_region)
        self.address_space = AddressSpace(self.system, "memory")
        self.kvm_listener = KvmMemoryListener(vm)
        self.address_space.add_listener(self.kvm_listener)
        # After the KVM listener: it counts only memslots KVM accepted.
        self.device_memslots_listener = MemoryDeviceListener(self.budget)
        self.address_space.add_listener(self.device_memslots_listener)

    # -- memory devices ------------------------------------------------------

    def plug(self, dev: VirtioMem) -> None:
        """Give ``dev`` an address and its memslots; refused with a
        MemoryDeviceError (nothing changed) when it does not fit."""
        area = self.layout.device_memory
        if area is None or self.device_memory_region is None:
            raise MemoryDeviceError(f"{dev.id}: the machine has no device memory "
                                    "(start it with maxmem larger than its RAM)")
        if dev.id in self.devices:
            raise MemoryDeviceError(f"a device with id {dev.id!r} is already plugged")
        if dev.props.node != 0:     # QEMU's virtio_mem_device_realize(); one NUMA node here
            raise MemoryDeviceError(f"{dev.id}: 'node' property has value '{dev.props.node}', "
                                    "which exceeds the number of numa nodes: 1")
        self._check_memdev_free(dev)
        split = self._memslot_split(dev, area.size)
        self._admit(dev, split.memslot_size, dev.requested_size, "the device")
        addr = self.device_memory.plug(dev.id, dev.region_size, dev.block_size, dev.props.memaddr)
        try:
            self.budget.reserve(dev.id, split.count)
            try:
                with memory_transaction():
                    top = dev.realize(addr, split.memslot_size)
                    self.device_memslots_listener.track(dev.id, dev.ram)
                    self.device_memory_region.add_subregion(addr - area.start, top)
            except BaseException:
                if dev.realized:
                    self.device_memslots_listener.untrack(dev.ram)
                self.budget.release(dev.id)
                raise
        except BaseException:
            self.device_memory.unplug(dev.id)
            dev.unbind()
            raise
        self.devices[dev.id] = dev
        # A memslot replaced under plugged memory stops every consumer of
        # the address space (vCPUs, vhost-user back-ends), not only KVM's.
        dev.quiesce = self.address_space.quiesced
        dev.admit_requested_size = lambda size, d=dev: self._admit(
            d, d.memslot_size, size, f"requested-size {size:#x}")

    def unplug(self, dev_id: str) -> VirtioMem:
        """Remove a memory device: unplug its blocks, unmap, free its range."""
        dev = self.devices.pop(dev_id)
        dev.admit_requested_size = None
        ram = dev.ram
        with memory_transaction():
            top = dev.unrealize()
            assert self.device_memory_region is not None
            self.device_memory_region.del_subregion(top)
        self.device_memslots_listener.untrack(ram)
        self.budget.release(dev_id)
        self.device_memory.unplug(dev_id)
        return dev

    def system_reset(self) -> None:
        """Machine reset: every memory device unplugs everything."""
        for dev in self.devices.values():
            dev.system_reset()

    def _memslot_split(self, dev: VirtioMem, area_size: int) -> MemslotSplit:
        if dev.props.memslots is MemslotMode.SINGLE:
            return MemslotSplit(dev.region_size, 1, 1)
        return memslots_for_device(dev.region_size, dev.block_size, area_size,
                                   self.budget.available(), dev.props.max_memslots)

    def _admit(self, dev: VirtioMem, memslot_size: int, requested: int, what: str) -> None:
        """Refuse (MemoryDeviceError, nothing changed) a device or a larger
        requested-size whose memslots would take the estimated KVM metadata
        of all devices over ``metadata_limit``."""
        def estimate(d: VirtioMem, slot_size: int, size: int) -> tuple[int, int, int]:
            now = (0, 0)
            if d.policy is not None:          # what the guest has mapped, it may keep
                now = (sum(span.size for span in d.policy.mapped), d.policy.nb_mapped)
            return device_estimate(d.props.memslots, d.region_size, d.block_size, slot_size,
                                   size, d.usable_region_size, now)

        new = estimate(dev, memslot_size, requested)
        old = estimate(dev, memslot_size, dev.requested_size)[0] if dev.id in self.devices else 0
        others = sum(estimate(d, d.memslot_size, d.requested_size)[0]
                     for i, d in self.devices.items() if i != dev.id)
        if new[0] > old and others + new[0] > self.metadata_limit:
            raise MemoryDeviceError(refusal(dev.id, what, new, others, self.metadata_limit,
                                            dev.props.memslots))

    def _check_memdev_free(self, dev: VirtioMem) -> None:
        """A backend serves one device: two would discard each other's
        plugged memory (QEMU's virtio_mem_device_realize refuses it too)."""
        for other in self.devices.values():
            if other.memdev is dev.memdev:
                raise MemoryDeviceError(f"{dev.id}: 'memdev' property specifies a busy memdev: "
                                        f"{dev.memdev.name} (already in use by {other.id})")

    # -- queries -------------------------------------------------------------

    def device_memslots(self, dev_id: str) -> list[DeviceMemslot]:
        """Every memslot of a device: index, guest range, mapped, KVM slot id."""
        dev = self.devices[dev_id]
        policy = dev.policy
        assert policy is not None                   # plugged devices are realized
        kvm_slots = {rec.guest_phys_addr: rec.slot for rec in self.kvm_listener.memslots()}
        result = []
        for index, span in enumerate(policy.spans()):
            gpa, mapped = dev.addr + span.offset, policy.is_mapped(span)
            result.append(DeviceMemslot(index, gpa, span.size, mapped,
                                        kvm_slots.get(gpa) if mapped else None))
        return result

    def owner(self, addr: int) -> str:
        """The id of the memory device whose range holds ``addr``, or ""."""
        return self.device_memory.owner(addr) or ""

    def info_mtree(self, flatview: bool = False) -> str:
        """``info mtree`` (or ``-f``) of this machine's address space."""
        return mtree_info(flatview, spaces=[self.address_space])

    def close(self) -> None:
        """Detach from KVM (deleting the memslots) and unmap boot RAM."""
        for dev_id in list(self.devices):
            self.unplug(dev_id)
        self.address_space.destroy()
        self.ram_host.close()
