"""A small pc-like VMM: one vCPU, the in-kernel irqchip and PIT, a UART,
QEMU's debug-exit port, and virtio-mem devices on virtio-mmio.

The run loop turns vCPU exits into device accesses: port I/O goes to the
UART, the debug-exit port or the reset port; MMIO is dispatched through the
system address space, so every MMIO device is an I/O region that shows in
``info mtree``. A guest access to device memory that no plugged block backs
is answered like unassigned memory (reads all ones, writes dropped),
counted and reported.
"""

from __future__ import annotations

import collections
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmmem.devices.notifier import Notifier
from kvmmem.devices.virtio_mem import VirtioMem, VirtioMemProps
from kvmmem.kvm import Kvm, KvmError, exits, lib
from kvmmem.kvm.vcpu import KICK_SIGNAL
from kvmmem.memory import HostMemory, RegionKind
from kvmmem.memory.guest_memory import GuestMemory
from kvmmem.vhost.backends import VhostBackends
from kvmmem.vhost.vhost_user_blk import VhostUserBlkProps
from kvmmem.virtio.mmio import VirtioMmioTransport
from kvmmem.vmm import boot, fatal_exits
from kvmmem.vmm.machine_memory import MachineMemory
from kvmmem.vmm.memslot_merger import MemslotMerger
from kvmmem.vmm.serial import Serial16550
from kvmmem.vmm.unplugged import UnpluggedAccess, UnpluggedAccessLog
from kvmmem.vmm.vcpu_gate import VcpuGate
from kvmmem.vmm.vhost_reconnect import VhostReconnector

log = logging.getLogger(__name__)

SERIAL_BASE = 0x3F8
DEBUG_EXIT_PORT = 0xF4
RESET_PORT, RESET_VALUE = 0x64, 0xFE
MMIO_BASE = 0xD0000000
FIRST_GSI = 5
TSS_ADDR, IDENTITY_MAP_ADDR = 0xFFFBD000, 0xFFFBC000


@dataclass
class MachineConfig:
    """What ``kvmmem run`` parses from QEMU-style options."""

    ram_size: int
    kernel: str
    maxmem: int | None = None
    slots: int = 0
    cmdline: str = ""
    memory_devices: list[VirtioMemProps] = field(default_factory=list)
    serial: Callable[[bytes], None] | None = None
    """Takes the UART's output in the vCPU thread, under ``Machine.lock``: it
    must not block (a sink that does I/O goes through chardev.BufferedOutput)."""
    no_reboot: bool = False
    memslot_metadata_limit: int | None = None
    """KVM memslot metadata the memory devices may cost; None: MemTotal / 4."""
    vhost_devices: list[VhostUserBlkProps] = field(default_factory=list)
    ram_backend: HostMemory | None = None
    objects: dict[str, tuple[str, HostMemory]] = field(default_factory=dict)
    """The ``-object`` memory backends by id: QOM type and memory (QOM lists them)."""


INTERNAL_ERROR_STATUS = 1
"""What :meth:`Machine.run` returns after an internal error when nobody
(no monitor) asked to keep the stopped machine."""


class MachineExit(Exception):
    """Raised inside the run loop to stop the machine with a status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _VcpuStopped(Exception):
    """Raised inside the run loop when the vCPU cannot go on (internal error)."""


class Machine:
    """A VM ready to run ``config.kernel`` under the Linux boot protocol."""

    def __init__(self, config: MachineConfig, kvm: Kvm | None = None) -> None:
        self.config = config
        # The only read of the kernel file: the parsed image stays in memory
        # and every reset loads it from there, as QEMU's rom blobs are copied
        # back to guest memory on reset (hw/core/loader.c, rom_reset).
        self.kernel_image = boot.parse_elf64(config.kernel, max_size=config.ram_size)
        self.kvm = kvm or Kvm()
        self.vm = self.kvm.create_vm()
        self.vm.set_tss_addr(TSS_ADDR)
        self.vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        self.vm.create_irqchip()
        self.vm.create_pit2(lib.KVM_PIT_SPEAKER_DUMMY)
        self.memory = MachineMemory(self.vm, config.ram_size, config.maxmem, config.slots,
                                    config.memslot_metadata_limit, ram_host=config.ram_backend)
        self.guest_memory = GuestMemory(self.memory.address_space)
        self.vhost = VhostBackends(self.memory, self.vm, self.guest_memory)
        self.serial = Serial16550(config.serial or (lambda data: None), SERIAL_BASE)
        self.devices: dict[str, VirtioMem] = {}
        self.transports: list[VirtioMmioTransport] = []
        self.unplugged = UnpluggedAccessLog()
        """Guest accesses to unplugged memory: a count and the most recent ones."""
        self._warning: str | None = None          # logged once the lock is released
        self.unplugged_access_notifiers: Notifier[UnpluggedAccess] = Notifier()
        self.reset_notifiers: Notifier[int] = Notifier()
        """Called after each system reset with the number of resets so far."""
        self.internal_error: str | None = None
        """Why the vCPU stopped, while it is stopped on an error (QEMU's
        ``internal-error`` run state); a reset clears it and runs the guest."""
        self.internal_error_notifiers: Notifier[str] = Notifier()
        """Called (vCPU thread, no lock held) when the vCPU stops on an error."""
        self.stop_on_internal_error = False
        """Keep the machine, stopped, after an internal error (a monitor can
        reset or quit it); otherwise :meth:`run` returns INTERNAL_ERROR_STATUS."""
        self.resets = 0
        self.lock = threading.RLock()
        """Held while an exit is handled; other threads (QMP) take it to change devices."""
        self._reset_pending = False
        self._stop_status: int | None = None
        self._running = threading.Event()
        self._running.set()
        self._parked = threading.Event()       # set while run() waits in pause
        self._park_lock = threading.Lock()     # orders parking and reset requests
        self._run_thread: int | None = None
        self.gate = VcpuGate(lambda: self.vcpu.kick())
        """Other threads stop the vCPU through it to replace memslots under plugged memory."""
        self.memory.kvm_listener.pause_vcpus = self.gate.quiesced
        self.merger = MemslotMerger(self.lock)
        """Runs the memslot merges memslots=exact defers (the devices' merge-delay)."""
        _install_kick_handler()
        # vhost-user back-ends first, so that the memory devices' memslot counts
        # respect their limits; their virtio-mmio windows come after the memory devices'.
        for vhost_props in config.vhost_devices:
            self.vhost.connect(vhost_props)
        for index, props in enumerate(config.memory_devices):
            self.vhost.check_memory_device(props.memdev, props.id)
            self._add_virtio_mem(props, MMIO_BASE + index * 0x1000, FIRST_GSI + index)
        for vhost_props in config.vhost_devices:
            self._add_vhost_transport(vhost_props.id)
        self.reconnector: VhostReconnector | None = None
        """Connects again to back-ends that went, for devices with ``reconnect``."""
        if any(p.reconnect for p in config.vhost_devices):
            self.reconnector = VhostReconnector(self.vhost, self.lock)
        self.vcpu = self.vm.create_vcpu(0)
        self.vcpu.set_cpuid2(self.kvm.get_supported_cpuid())
        self._power_on_state = self._save_cpu_and_irqchip()
        self.layout = boot.apply_boot(self.vcpu, self._ram_writer(), self._boot_plan())

    def _add_virtio_mem(self, props: VirtioMemProps, base: int, gsi: int) -> None:
        dev = VirtioMem(props)
        self.merger.watch(dev)
        self.memory.plug(dev)
        transport = VirtioMmioTransport(dev, self.guest_memory, self.vm, gsi, base=base,
                                        name=f"virtio-mmio-{props.id}")
        self.memory.system.add_subregion(base, transport.region)
        self.devices[props.id] = dev
        self.transports.append(transport)

    def add_vhost_user_blk(self, props: VhostUserBlkProps) -> None:
        """Add a vhost-user-blk device now (refused, nothing changed, when its back-end
        cannot hold the memslots in use and reserved); the guest sees it after a reset."""
        with self.lock:
            self.vhost.connect(props)
            self._add_vhost_transport(props.id)

    def _add_vhost_transport(self, dev_id: str) -> None:
        index = len(self.transports)
        transport = self.vhost.realize(dev_id, MMIO_BASE + index * 0x1000, FIRST_GSI + index)
        self.memory.system.add_subregion(transport.base or 0, transport.region)
        self.transports.append(transport)

    @property
    def cmdline(self) -> str:
        """The kernel command line: the devices in Linux's syntax, then the user's."""
        parts = ["console=ttyS0"] + [t.linux_cmdline() for t in self.transports]
        return " ".join(parts + ([self.config.cmdline] if self.config.cmdline else []))

    def _ram_writer(self) -> boot.WritePhys:
        return boot.guest_writer(self.guest_memory)

    def _boot_plan(self) -> boot.BootPlan:
        """What loading the kernel writes (pure: checks only, nothing written)."""
        layout = self.memory.layout
        return boot.prepare_boot(self.kernel_image, self.cmdline, layout.e820(),
                                 layout.identity_map_end)

    # -- running -----------------------------------------------------------

    def request_reset(self) -> None:
        """Reset the machine; safe from any thread. A paused machine is reset
        at once, a running one before its vCPU runs guest code again."""
        with self._park_lock:
            if self._parked.is_set():          # and stays parked until we are done
                with self.lock:
                    self.reset()
                return
            self._reset_pending = True
        self.vcpu.kick()

    def pause(self, timeout: float = 10.0) -> None:
        """Stop running guest code until :meth:`resume` (QMP ``stop``); from
        another thread, returns once the vCPU has stopped."""
        self._running.clear()
        self.vcpu.kick()
        if self._run_thread not in (None, threading.get_ident()):
            if not self._parked.wait(timeout):
                raise TimeoutError("the vCPU did not stop")

    def resume(self) -> None:
        """Run guest code again (QMP ``cont``); after an internal error only
        a reset can (QEMU's ``runstate_needs_reset``)."""
        if self.internal_error is not None:
            raise RuntimeError("the vCPU stopped on an internal error: reset the machine")
        self._running.set()

    @property
    def unplugged_accesses(self) -> collections.deque[UnpluggedAccess]:
        """The most recent guest accesses to unplugged memory, oldest first."""
        return self.unplugged.recent

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    @property
    def stop_requested(self) -> bool:
        """Whether :meth:`shutdown` was called (:meth:`run` then returns at once)."""
        return self._stop_status is not None

    def shutdown(self, status: int = 0) -> None:
        """Make :meth:`run` return ``status``; safe from any thread (QMP ``quit``)."""
        self._stop_status = status
        self._running.set()
        self.vcpu.kick()

    def run(self) -> int:
        """Run until the guest or :meth:`shutdown` stops the machine; return
        the exit status. Call it from one thread (the vCPU thread)."""
        self._run_thread = threading.get_ident()
        try:
            while self._stop_status is None:
                if self._park_or_reset():
                    continue
                self.gate.enter_guest()
                try:
                    ex = self.vcpu.run()
                except KvmError as exc:
                    self._stop_on_error(fatal_exits.describe(self.vcpu, exc))
                    continue
                finally:
                    self.gate.leave_guest()
                try:
                    with self.lock:
                        self._handle(ex)
                except _VcpuStopped:           # reported without the lock held
                    self._stop_on_error(fatal_exits.describe(self.vcpu, ex))
                finally:
                    if self._warning is not None:
                        log.warning("%s", self._warning)
                        self._warning = None
            return self._stop_status
        except MachineExit as stop:
            return stop.status
        finally:
            self._run_thread = None

    def _park_or_reset(self) -> bool:
        """Do a requested reset, or wait while paused; True when done either."""
        with self._park_lock:
            reset, self._reset_pending = self._reset_pending, False
            park = not reset and not self._running.is_set()
            if park:
                self._parked.set()
        if reset:
            with self.lock:
                self.reset()
        elif park:
            self._running.wait()
            with self._park_lock:             # not while request_reset resets
                self._parked.clear()
        return reset or park

    def _stop_on_error(self, message: str) -> None:
        """QEMU's ``vm_stop(RUN_STATE_INTERNAL_ERROR)``: report once, stop the vCPU."""
        if not self.stop_on_internal_error:
            log.error("%s; stopping the machine", message)
            raise MachineExit(INTERNAL_ERROR_STATUS)
        log.error("%s; the vCPU is stopped (internal-error) until a system reset", message)
        self.internal_error = message
        self._running.clear()
        self.internal_error_notifiers.notify(message)

    def _handle(self, ex: exits.VcpuExit) -> None:
        if isinstance(ex, exits.IoExit):
            self._port_io(ex)
        elif isinstance(ex, exits.MmioExit):
            self._mmio(ex)
        elif isinstance(ex, exits.MemoryFaultExit):
            self._unplugged(ex.gpa, False)
            raise _VcpuStopped()
        elif isinstance(ex, exits.ShutdownExit) or (
                isinstance(ex, exits.SystemEventExit) and ex.type == lib.KVM_SYSTEM_EVENT_RESET):
            self._reboot("triple fault" if isinstance(ex, exits.ShutdownExit) else "reset event")
        elif isinstance(ex, exits.SystemEventExit):
            raise MachineExit(0)
        elif isinstance(ex, (exits.HltExit, exits.IntrExit)):
            return
        else:                 # internal error, failed entry, unknown exit: QEMU stops
            raise _VcpuStopped()

    def _port_io(self, ex: exits.IoExit) -> None:
        port = ex.port
        if ex.is_write:
            for i in range(ex.count):
                value = int.from_bytes(ex.data[i * ex.size:(i + 1) * ex.size], "little")
                if SERIAL_BASE <= port < SERIAL_BASE + 8:
                    self.serial.write(port - SERIAL_BASE, value)
                elif port == DEBUG_EXIT_PORT:
                    raise MachineExit((value << 1) | 1)
                elif port == RESET_PORT and value == RESET_VALUE:
                    self._reboot("reset via port 0x64")
            return
        if SERIAL_BASE <= port < SERIAL_BASE + 8:
            data = bytes([self.serial.read(port - SERIAL_BASE)]) * ex.size
        else:
            data = b"\xff" * ex.size
        self.vcpu.complete_io_in(data * ex.count)

    def _mmio(self, ex: exits.MmioExit) -> None:
        fr = self.memory.address_space.lookup(ex.phys_addr)
        if fr is not None and fr.region.kind is RegionKind.IO:
            offset = fr.offset + ex.phys_addr - fr.start
            if ex.is_write:
                fr.region.dispatch_write(offset, ex.length, int.from_bytes(ex.data, "little"))
            else:
                value = fr.region.dispatch_read(offset, ex.length)
                self.vcpu.complete_mmio_read(value.to_bytes(ex.length, "little"))
            return
        self._unplugged(ex.phys_addr, ex.is_write)
        if not ex.is_write:
            self.vcpu.complete_mmio_read(b"\xff" * ex.length)

    def _unplugged(self, address: int, is_write: bool) -> None:
        owner = self.memory.owner(address)
        access = UnpluggedAccess(owner, address, self.vcpu.id, is_write)
        self._warning = self.unplugged.record(access)     # None while rate-limited
        self.unplugged_access_notifiers.notify(access)

    def _reboot(self, why: str) -> None:
        if self.config.no_reboot:
            log.info("%s with -no-reboot: stopping", why)
            raise MachineExit(0)
        log.info("%s: resetting the machine", why)
        self.reset()

    def reset(self) -> None:
        """System reset: transports reset (vhost-user back-ends stopped once
        their requests finished), memory devices unplug everything, the UART
        resets, the kernel is loaded again from the image read at start and
        the vCPU restarted. The boot plan is computed before anything
        changes, so a reset that cannot load the kernel changes nothing."""
        plan = self._boot_plan()
        self.resets += 1
        stopped_on_error, self.internal_error = self.internal_error, None
        self._restore_cpu_and_irqchip(self._power_on_state)
        # Devices first: a vhost-user back-end finishes its requests and stops
        # (QEMU's vhost_dev_stop) before the memory it uses is unplugged.
        for transport in self.transports:
            transport.reset()
        self.memory.system_reset()
        self.serial.reset()
        self.layout = boot.apply_boot(self.vcpu, self._ram_writer(), plan)
        if stopped_on_error is not None:      # QEMU leaves internal-error on reset
            self._running.set()
        self.reset_notifiers.notify(self.resets)

    def _save_cpu_and_irqchip(self) -> tuple:  # type: ignore[type-arg]
        chips = [self.vm.get_irqchip(chip) for chip in
                 (lib.KVM_IRQCHIP_PIC_MASTER, lib.KVM_IRQCHIP_PIC_SLAVE, lib.KVM_IRQCHIP_IOAPIC)]
        return chips, self.vm.get_pit2(), self.vcpu.get_lapic(), self.vcpu.get_vcpu_events()

    def _restore_cpu_and_irqchip(self, state: tuple) -> None:  # type: ignore[type-arg]
        """Power-on state of the interrupt controllers, the PIT and the vCPU's
        pending events, and wake it if it was halted: a reset must not deliver
        interrupts the old guest had pending (or a timer it programmed) to
        the new one."""
        chips, pit, lapic, events = state
        self.vcpu.complete_pending()
        for chip in chips:
            self.vm.set_irqchip(chip)
        self.vm.set_pit2(pit)
        self.vcpu.set_lapic(lapic)
        self.vcpu.set_vcpu_events(events)
        self.vcpu.set_mp_state(lib.KVM_MP_STATE_RUNNABLE)

    def close(self) -> None:
        """Unplug the memory devices, unwire the interrupts, close the VM."""
        self.merger.close()
        if self.reconnector is not None:
            self.reconnector.close()
        for transport in self.transports:
            transport.close()
        self.vhost.close()
        self.memory.close()
        self.vm.close()


def _install_kick_handler() -> None:
    """``Vcpu.kick`` signals the vCPU thread; the signal must not kill the
    process, so give it a no-op handler (only the main thread can)."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
