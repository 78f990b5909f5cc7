"""A stopped machine into a migration stream, and a stream into a new machine.

:func:`save_machine` writes, in this order (DESIGN.md, "Migration stream"):

1. CONFIG: what the destination must have been started with (RAM, maxmem,
   each memory device's id, size, block size, memslot mode and address);
2. one STATE ``virtio-mem:<id>`` per device, before any RAM, so that the
   destination plugs the same blocks and maps their memslots first (QEMU's
   early virtio-mem migration);
3. RAM: boot RAM and the *plugged* blocks of each device, without zero pages
   (unplugged memory is never read);
4. STATE ``kvm`` (PICs, IOAPIC, PIT, clock), ``cpu`` (a list: one entry per
   vCPU), ``serial`` and one ``virtio-mmio@<base>`` per transport;
5. END.

:func:`load_machine` takes a machine built from the same options that has
not run, checks each section against it (a stream for another machine, or
a damaged or hostile one, is one :class:`MigrationError` naming the
section) and leaves it ready to run from where the source stopped.
vhost-user devices are a migration blocker: their back-ends' dirty logs
are not followed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvmmem.kvm.state import VcpuState, VmState, readable_msrs, restore_vcpu, restore_vm, save_vcpu, save_vm
from kvmmem.memory import PAGE_SIZE, HostMemory
from kvmmem.migration.stream import Kind, StreamError, StreamReader, StreamWriter
from kvmmem.vmm.machine import Machine

__all__ = ["MigrationError", "blockers", "load_machine", "machine_config", "msr_indices",
           "ram_ranges",
           "save_machine", "send_range", "write_head", "write_tail"]

CHUNK = 256 << 10                   # bytes of RAM read and sent at a time
SEGMENT = 64 << 20                  # bytes whose page map is read at a time
_ZERO_PAGE = bytes(PAGE_SIZE)


class MigrationError(StreamError):
    """The machine cannot be saved, or the stream cannot be loaded into it."""


def machine_config(machine: Machine) -> dict[str, Any]:
    """What source and destination must agree on."""
    cfg = machine.config
    return {"ram_size": cfg.ram_size, "maxmem": cfg.maxmem,
            "memory_devices": [{"id": d.id, "region_size": d.region_size,
                                "block_size": d.block_size, "memslots": d.props.memslots.value,
                                "addr": d.addr} for d in machine.devices.values()],
            "transports": [t.name for t in machine.transports]}


def blockers(machine: Machine) -> list[str]:
    """Why this machine cannot be migrated (QEMU's migration blockers)."""
    return [f"vhost-user-blk '{dev_id}' does not support migration (its back-end's dirty "
            "log is not followed)" for dev_id in machine.vhost.devices]


# -- saving -------------------------------------------------------------------------

def save_machine(machine: Machine, out: StreamWriter) -> None:
    """Write the whole stream of a machine whose vCPU is stopped."""
    write_head(machine, out)
    send_ram(machine, out)
    write_tail(machine, out)


def write_head(machine: Machine, out: StreamWriter) -> None:
    """The configuration and the virtio-mem states (refused with a blocker)."""
    reasons = blockers(machine)
    if reasons:
        raise MigrationError(reasons[0])
    out.json(Kind.CONFIG, "machine", machine_config(machine))
    for dev in machine.devices.values():
        out.json(Kind.STATE, f"virtio-mem:{dev.id}", dev.save_state())


def msr_indices(machine: Machine) -> list[int]:
    """The MSRs to save: those of KVM's index list this vCPU can read (call with
    the vCPU stopped: KVM_GET_MSRS from another thread waits for KVM_RUN to end)."""
    return readable_msrs(machine.vcpu, machine.kvm.get_msr_index_list())


def write_tail(machine: Machine, out: StreamWriter) -> None:
    """The state of KVM, the vCPU, the UART and the transports, then END
    (the vCPU must be stopped)."""
    out.json(Kind.STATE, "kvm", _vm_json(save_vm(machine.vm)))
    out.json(Kind.STATE, "cpu", [_vcpu_json(save_vcpu(machine.vcpu, msr_indices(machine)))])
    out.json(Kind.STATE, "serial", machine.serial.save_state())
    for transport in machine.transports:
        out.json(Kind.STATE, transport.name, transport.save_state())
    out.end()


def ram_ranges(machine: Machine) -> list[tuple[HostMemory, int, int]]:
    """(host memory, offset, size) of every range of guest memory to send:
    boot RAM whole, of each device only its plugged blocks."""
    ranges = [(machine.memory.ram_host, 0, machine.memory.ram_host.size)]
    for dev in machine.devices.values():
        bits = dev.bitmap
        assert bits is not None
        ranges += [(dev.memdev, first * dev.block_size, n * dev.block_size)
                   for first, n in bits.plugged_runs()]
    return ranges


def send_ram(machine: Machine, out: StreamWriter) -> None:
    for host, offset, size in ram_ranges(machine):
        send_range(out, host, offset, size)


def send_range(out: StreamWriter, host: HostMemory, offset: int, size: int,
               skip_zero: bool = True, each_chunk: Callable[[], None] | None = None) -> None:
    """``[offset, offset + size)`` of ``host`` as RAM sections, zero pages left
    out unless ``skip_zero`` is False (a page sent before may have become zero);
    ``each_chunk`` is called before each chunk read (a migration checks for a
    cancel and keeps to its bandwidth there)."""
    pace = each_chunk or (lambda: None)
    if not skip_zero:
        for start in range(offset, offset + size, CHUNK):
            pace()
            out.ram(host.name, start, host.read(start, min(CHUNK, offset + size - start)))
        return
    chunk_pages = CHUNK // PAGE_SIZE
    for segment in range(offset, offset + size, SEGMENT):
        pace()
        # one look at the page map per segment: never-touched pages are not read
        maybe = host.maybe_data(segment, min(SEGMENT, offset + size - segment))
        page = 0
        while page < len(maybe):
            if not maybe[page]:
                page += 1
                continue
            end = page
            while end < len(maybe) and maybe[end] and end - page < chunk_pages:
                end += 1
            pace()
            start = segment + page * PAGE_SIZE
            _send_nonzero(out, host, start, host.read(start, (end - page) * PAGE_SIZE))
            page = end


def _send_nonzero(out: StreamWriter, host: HostMemory, offset: int, data: bytes) -> None:
    """``data`` (whole pages read at ``offset``) as RAM sections, zero pages left out."""
    run_start = None
    for page in range(0, len(data) + PAGE_SIZE, PAGE_SIZE):
        zero = page >= len(data) or data[page:page + PAGE_SIZE] == _ZERO_PAGE
        if not zero and run_start is None:
            run_start = page
        elif zero and run_start is not None:
            out.ram(host.name, offset + run_start, data[run_start:page])
            run_start = None


def _vm_json(state: VmState) -> dict[str, Any]:
    return {"irqchips": [b.hex() for b in state.irqchips], "pit": state.pit.hex(),
            "clock": state.clock}


def _vcpu_json(state: VcpuState) -> dict[str, Any]:
    return {"regs": state.regs.hex(), "sregs": state.sregs.hex(), "xsave": state.xsave.hex(),
            "xcrs": state.xcrs.hex(), "debugregs": state.debugregs.hex(),
            "msrs": [list(m) for m in state.msrs], "mp_state": state.mp_state,
            "lapic": state.lapic.hex(), "events": state.events.hex()}


# -- loading ------------------------------------------------------------------------

def load_machine(machine: Machine, source: StreamReader) -> None:
    """Load a stream into ``machine`` (built from the same options, never run)."""
    kind, name, payload = source.section()
    if kind is not Kind.CONFIG:
        raise MigrationError(f"the stream starts with section {name!r}, not the machine's "
                             "configuration")
    theirs, ours = source.parse_json(name, payload), machine_config(machine)
    if theirs != ours:
        raise MigrationError(f"the stream is of another machine: it has {_differ(theirs, ours)}")
    hosts = {machine.memory.ram_host.name: machine.memory.ram_host}
    hosts |= {dev.memdev.name: dev.memdev for dev in machine.devices.values()}
    machine.memory.ram_host.discard(0, machine.memory.ram_host.size)   # zero pages are not sent
    states: dict[str, Any] = {}
    expected = ({f"virtio-mem:{d}" for d in machine.devices} | {"kvm", "cpu", "serial"}
                | {t.name for t in machine.transports})
    while True:
        kind, name, payload = source.section()
        if kind is Kind.END:
            break
        if kind is Kind.RAM:
            _load_ram(machine, hosts, name, *source.parse_ram(name, payload))
            continue
        if kind is not Kind.STATE or name not in expected or name in states:
            raise MigrationError(f"unexpected section {kind.name} {name!r}")
        state = source.parse_json(name, payload)
        try:
            _load_state(machine, name, state)
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
            if isinstance(exc, MigrationError):
                raise
            raise MigrationError(f"section {name!r}: bad state: {exc!r}") from None
        states[name] = state
    missing = expected - set(states)
    if missing:
        raise MigrationError(f"the stream ended without {', '.join(sorted(missing))}")


def _load_state(machine: Machine, name: str, state: Any) -> None:
    if name.startswith("virtio-mem:"):
        machine.devices[name.split(":", 1)[1]].load_state(state)
    elif name == "kvm":
        restore_vm(machine.vm, VmState(irqchips=tuple(bytes.fromhex(b) for b in state["irqchips"]),
                                       pit=bytes.fromhex(state["pit"]), clock=int(state["clock"])))
    elif name == "cpu":
        if len(state) != 1:
            raise ValueError(f"{len(state)} vCPUs in the stream, 1 here")
        s = state[0]
        restore_vcpu(machine.vcpu, VcpuState(
            regs=bytes.fromhex(s["regs"]), sregs=bytes.fromhex(s["sregs"]),
            xsave=bytes.fromhex(s["xsave"]), xcrs=bytes.fromhex(s["xcrs"]),
            debugregs=bytes.fromhex(s["debugregs"]),
            msrs=tuple((int(i), int(v)) for i, v in s["msrs"]), mp_state=int(s["mp_state"]),
            lapic=bytes.fromhex(s["lapic"]), events=bytes.fromhex(s["events"])))
    elif name == "serial":
        machine.serial.load_state(state)
    else:
        next(t for t in machine.transports if t.name == name).load_state(state)


def _load_ram(machine: Machine, hosts: dict[str, HostMemory], name: str, offset: int,
              data: bytes) -> None:
    host = hosts.get(name)
    if host is None:
        raise MigrationError(f"RAM for unknown memory {name!r}")
    if offset % PAGE_SIZE or len(data) % PAGE_SIZE or offset + len(data) > host.size:
        raise MigrationError(f"RAM of {name!r} at {offset:#x}+{len(data):#x}: not whole pages "
                             "inside the memory")
    for dev in machine.devices.values():
        if dev.memdev is host:
            bits = dev.bitmap
            assert bits is not None
            first, last = offset // dev.block_size, -(-(offset + len(data)) // dev.block_size)
            if bits.any_in_state(first, last - first, plugged=False):
                raise MigrationError(f"RAM of {name!r} at {offset:#x}+{len(data):#x} lies in "
                                     "unplugged blocks")
    host.write(offset, data)


def _differ(theirs: Any, ours: dict[str, Any]) -> str:
    if not isinstance(theirs, dict):
        return "no configuration"
    for key, value in ours.items():
        if theirs.get(key) != value:
            return f"{key}={theirs.get(key)!r}, this one {value!r}"
    return f"other keys ({', '.join(sorted(set(theirs) - set(ours)))})"
