"""``kvmmem run``: start a VM from the command line, spelled as QEMU's.

    kvmmem run -m 4G,maxmem=1028G,slots=4 \\
        -object memory-backend-ram,id=mem0,size=500G \\
        -device virtio-mem,id=vmem0,memdev=mem0,requested-size=2G,memslots=dynamic \\
        -kernel build/guest/guest.elf -append "kvmmem.steps=3" -serial stdio

A bad option is refused with one line that names it and says why.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from kvmmem.devices.virtio_mem_props import VirtioMemProps
from kvmmem.memory import HostMemory
from kvmmem.units import MiB, SizeError, parse_size

if TYPE_CHECKING:
    from kvmmem.vmm.machine import Machine
    from kvmmem.vmm.qmp import QmpServer
from kvmmem.vmm.chardev import BufferedOutput, fd_writer
from kvmmem.vmm.host_signals import HostSignals
from kvmmem.vmm.log_output import StderrLog

DEVICE_DRIVERS = ("virtio-mem", "virtio-mem-device")
VHOST_DRIVERS = ("vhost-user-blk", "vhost-user-blk-device")
BACKENDS = ("memory-backend-ram", "memory-backend-memfd")
_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")
_BOOL = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


class OptionError(ValueError):
    """A command-line option kvmmem cannot use: ``option`` says which."""

    def __init__(self, option: str, why: str) -> None:
        super().__init__(f"{option}: {why}")
        self.option = option


def parse_keyval(option: str, text: str, implied: str) -> dict[str, str]:
    """QEMU's ``first,key=value,...``: the first item may omit ``implied=``."""
    result: dict[str, str] = {}
    for i, item in enumerate(text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            if i != 0:
                raise OptionError(option, f"{item!r} is not key=value")
            key, value = implied, item
        if not key or key in result:
            raise OptionError(option, f"{key or item!r} is empty or given twice")
        result[key] = value
    if "id" in result and not _ID.fullmatch(result["id"]):     # QEMU's id_wellformed()
        raise OptionError(option, "Parameter 'id' expects an identifier (letters, digits, "
                                  "'-', '.', '_', starting with a letter)")
    return result


def _size(option: str, key: str, value: str, default_unit: int = 1) -> int:
    try:
        return parse_size(value, default_unit=default_unit)
    except SizeError as exc:
        raise OptionError(option, f"{key}={value!r} is not a size: {exc.reason} "
                                  "(examples: 512M, 2G)") from None


def _require(option: str, opts: dict[str, str], key: str) -> str:
    """The value of a parameter the option cannot do without (QEMU's wording)."""
    if key not in opts:
        raise OptionError(option, f"Parameter '{key}' is missing")
    return opts[key]


def _bool(option: str, key: str, value: str) -> bool:
    try:
        return _BOOL[value.lower()]
    except KeyError:
        raise OptionError(option, f"{key}={value!r} is not on or off") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"kvmmem run: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kvmmem run", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", required=True, metavar="SIZE[,maxmem=SIZE][,slots=N]",
                   help="boot RAM, and the device-memory area (maxmem - RAM + 1 GiB per slot)")
    p.add_argument("-machine", default="pc",
                   metavar="[type=]pc[,memslot-metadata-limit=SIZE][,memory-backend=ID]",
                   help="KVM memslot metadata the memory devices may cost (default: MemTotal/4); "
                        "boot RAM from a -object (shared, for vhost-user)")
    p.add_argument("-object", action="append", default=[], metavar="memory-backend-ram,id=ID,size=SIZE")
    p.add_argument("-device", action="append", default=[], metavar="virtio-mem,id=ID,memdev=ID,...")
    p.add_argument("-chardev", action="append", default=[], metavar="socket,id=ID,path=PATH")
    p.add_argument("-kernel", required=True, help="ELF64 kernel for the Linux 64-bit boot protocol")
    p.add_argument("-append", default="", help="kernel command line (after the devices)")
    p.add_argument("-serial", default="stdio", help="stdio, file:PATH or none")
    p.add_argument("-no-reboot", dest="no_reboot", action="store_true",
                   help="exit instead of resetting when the guest resets")
    p.add_argument("-qmp", default=None, metavar="unix:PATH,server=on,wait=off")
    p.add_argument("-incoming", default=None, metavar="file:PATH|unix:PATH|exec:CMD",
                   help="start from a migration stream (a snapshot file, or a live migration)")
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line as QEMU does: an option that takes a value
    takes the next word whatever it looks like (``-m -1G`` gives -m the
    value ``-1G``, refused later as a size, not as a missing argument)."""
    parser = build_parser()
    takes_value = {s for a in parser._actions if a.option_strings and a.nargs is None
                   for s in a.option_strings}
    words, i = [], 0
    while i < len(argv):
        if argv[i] in takes_value and i + 1 < len(argv):
            words.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            words.append(argv[i])
            i += 1
    return parser.parse_args(words)


def parse_machine(args: argparse.Namespace, sink: Callable[[bytes], None] | None) -> Any:
    """Turn parsed options into a MachineConfig (HostMemory objects included)."""
    from kvmmem.vmm.machine import MachineConfig

    mem = parse_keyval("-m", args.m, "size")
    unknown = set(mem) - {"size", "maxmem", "slots"}
    if unknown:
        raise OptionError("-m", f"unknown key {sorted(unknown)[0]!r}")
    ram = _size("-m", "size", _require("-m", mem, "size"), MiB)   # QEMU: -m 512 is 512 MiB
    maxmem = _size("-m", "maxmem", mem["maxmem"]) if "maxmem" in mem else None
    try:
        slots = int(mem.get("slots", "0"))
    except ValueError:
        raise OptionError("-m", f"slots={mem['slots']!r} is not a number") from None
    _check_memory_map(ram, maxmem, slots)
    metadata_limit = _machine(args.machine)
    backends: dict[str, HostMemory] = {}
    objects: dict[str, str] = {}               # -object id -> its QOM type
    own: list[HostMemory] = []
    busy: set[str] = set()                     # memdev ids a device already uses
    try:
        for text in args.object:
            spec = _backend(text)
            if spec.id in backends:           # QEMU's object_property_try_add() wording
                raise OptionError("-object", f"attempt to add duplicate property '{spec.id}' to "
                                             "object (type 'container')")
            backends[spec.id] = _allocate("-object", spec.id, spec.size, spec.shared, spec.seal)
            objects[spec.id] = spec.qom_type
        from kvmmem.vmm.cli_vhost import chardevs as _chardevs
        from kvmmem.vmm.cli_vhost import ram_backend, vhost_user_blk

        chardevs = _chardevs(args.chardev)
        ram_host = ram_backend(args.machine, backends, ram, busy)
        devices: list[VirtioMemProps] = []
        vhost_devices: list[Any] = []
        ids: set[str] = set()                  # one namespace for every -device id
        for text in args.device:
            dev = parse_keyval("-device", text, "driver")
            if dev.get("id") in ids:                          # QEMU's qemu_opts_create()
                raise OptionError("-device", f"Duplicate ID '{dev['id']}' for device")
            if dev.get("driver") in VHOST_DRIVERS:
                del dev["driver"]
                vhost_devices.append(vhost_user_blk(dev, chardevs, len(vhost_devices),
                                                    {v.chardev for v in vhost_devices}))
                ids.add(vhost_devices[-1].id)
                continue
            if _require("-device", dev, "driver") not in DEVICE_DRIVERS:
                raise OptionError("-device", f"only {', '.join(DEVICE_DRIVERS + VHOST_DRIVERS)} "
                                             "are supported")
            del dev["driver"]
            if "id" not in dev:
                raise OptionError("-device", "virtio-mem needs id= (QMP names the device "
                                             "/machine/peripheral/ID)")
            ids.add(dev["id"])
            memdev = dev.get("memdev")
            if memdev is not None:
                if memdev in busy:                        # QEMU's virtio_mem_device_realize()
                    raise OptionError("-device", "'memdev' property specifies a busy memdev: "
                                                 f"{memdev}")
                busy.add(memdev)
            devices.append(_virtio_mem(dev, backends))
            if "memdev" not in dev and "size" in dev:     # kvmmem's own: memory of its own
                own.append(_allocate("-device", f"{devices[-1].id}-memdev",
                                     devices[-1].region_size))
                devices[-1].memdev = own[-1]
    except BaseException:
        for backend in [*backends.values(), *own]:
            backend.close()
        raise
    return MachineConfig(ram_size=ram, kernel=args.kernel, maxmem=maxmem, slots=slots,
                         cmdline=args.append, memory_devices=devices, serial=sink,
                         no_reboot=args.no_reboot, memslot_metadata_limit=metadata_limit,
                         vhost_devices=vhost_devices, ram_backend=ram_host,
                         objects={i: (objects[i], backends[i]) for i in objects})


def _machine(text: str) -> int | None:
    """``-machine [type=]pc[,accel=kvm][,memslot-metadata-limit=SIZE][,memory-backend=ID]``:
    the limit, if given (memory-backend is taken by ``cli_vhost.ram_backend``)."""
    opts = parse_keyval("-machine", text, "type")
    unknown = set(opts) - {"type", "accel", "memslot-metadata-limit", "memory-backend"}
    if unknown:
        raise OptionError("-machine", f"unknown key {min(unknown)!r}")
    if opts.get("type", "pc") != "pc":
        raise OptionError("-machine", f"type={opts['type']!r}: kvmmem has the pc machine only")
    if opts.get("accel", "kvm") != "kvm":
        raise OptionError("-machine", f"accel={opts['accel']!r}: kvmmem runs on KVM only")
    if "memslot-metadata-limit" not in opts:
        return None
    return _size("-machine", "memslot-metadata-limit", opts["memslot-metadata-limit"])


def _check_memory_map(ram: int, maxmem: int | None, slots: int) -> None:
    """The pc memory map ``-m`` asks for, checked before anything is mapped:
    its rules, and an end a guest with 4-level paging can map (QEMU checks maxmem
    against the CPU's physical address bits the same way)."""
    from kvmmem.devices.memory_device import MemoryDeviceError
    from kvmmem.vmm.boot import MAX_MAP_SIZE
    from kvmmem.vmm.pc_layout import MachineMemoryMap

    try:
        layout = MachineMemoryMap(ram, maxmem, slots)
    except MemoryDeviceError as exc:
        raise OptionError("-m", str(exc)) from None
    end = layout.end
    if end > MAX_MAP_SIZE:
        raise OptionError("-m", f"the memory map ends at {end:#x}, beyond the {MAX_MAP_SIZE:#x} "
                                "bytes of guest-physical address space a 4-level guest maps")


# QEMU's memory-backend properties (qemu-options.hx, "-object memory-backend-*"):
# those kvmmem implements, by type, and those it knows and refuses.
_BACKEND_KEYS = {"memory-backend-ram": {"qom-type", "id", "size", "share"},
                 "memory-backend-memfd": {"qom-type", "id", "size", "share", "seal", "hugetlb"}}
_BACKEND_UNSUPPORTED = {"merge", "dump", "prealloc", "prealloc-threads", "prealloc-context",
                        "reserve", "host-nodes", "policy", "hugetlbsize",
                        "x-use-canonical-path-for-ramblock-id"}


@dataclass(frozen=True)
class BackendSpec:
    """One ``-object memory-backend-...`` as given (memory not allocated yet)."""

    id: str
    qom_type: str
    size: int
    shared: bool
    seal: bool


def _qemu_bool(option: str, opts: dict[str, str], key: str, default: bool) -> bool:
    """A boolean property, refused in QEMU's words (qapi_bool_parse)."""
    if key not in opts:
        return default
    try:
        return _BOOL[opts[key].lower()]
    except KeyError:
        raise OptionError(option, f"Parameter '{key}' expects 'on' or 'off'") from None


def _backend(text: str) -> BackendSpec:
    """One ``-object memory-backend-...``; unknown properties are refused as QEMU
    refuses them, those QEMU has and kvmmem does not implement by name."""
    obj = parse_keyval("-object", text, "qom-type")
    qom_type = _require("-object", obj, "qom-type")
    if qom_type not in BACKENDS:
        raise OptionError("-object", f"{qom_type!r} is not one of {', '.join(BACKENDS)}")
    for key in sorted(set(obj) - _BACKEND_KEYS[qom_type]):
        if key in _BACKEND_UNSUPPORTED:
            raise OptionError("-object", f"Property '{qom_type}.{key}' is not supported by kvmmem")
        raise OptionError("-object", f"Property '{qom_type}.{key}' not found")
    if "id" not in obj or "size" not in obj:
        raise OptionError("-object", f"{qom_type} needs id= and size=")
    memfd = qom_type == "memory-backend-memfd"
    shared = _qemu_bool("-object", obj, "share", memfd)
    seal = _qemu_bool("-object", obj, "seal", memfd)          # QEMU: memfd seal=on by default
    if _qemu_bool("-object", obj, "hugetlb", False):
        raise OptionError("-object", f"{qom_type}: hugetlb=on is not supported by kvmmem "
                                     "(guest memory is never backed by hugetlbfs pages)")
    return BackendSpec(obj["id"], qom_type, _size("-object", "size", obj["size"]), shared,
                       seal and shared)


def _allocate(option: str, name: str, size: int, shared: bool = False,
              seal: bool = False) -> HostMemory:
    """A backend's memory; a size the host cannot map is the option's fault."""
    try:
        return HostMemory(size, name, shared=shared, seal=seal)
    except (OSError, ValueError, OverflowError) as exc:
        raise OptionError(option, f"{name}: cannot allocate size={size:#x}: {exc}") from None


def _virtio_mem(dev: dict[str, str], backends: dict[str, HostMemory]) -> VirtioMemProps:
    props: dict[str, Any] = {}
    for key, value in dev.items():
        if key == "memdev":
            if value not in backends:
                raise OptionError("-device", f"memdev={value!r}: no -object with that id")
            props[key] = backends[value]
        elif key in ("size", "block-size", "requested-size", "memaddr"):
            props[key] = _size("-device", key, value)
        elif key in ("prealloc", "unplugged-inaccessible"):
            props[key] = _bool("-device", key, value)
        elif key in ("node", "max-memslots", "merge-delay"):
            try:
                props[key] = int(value, 0)
            except ValueError:
                raise OptionError("-device", f"{key}={value!r} is not a number") from None
        else:
            props[key] = value
    try:
        return VirtioMemProps.from_qemu(props)
    except (ValueError, TypeError) as exc:
        raise OptionError("-device", str(exc)) from None


def _serial_sink(spec: str) -> Callable[[bytes], None] | None:
    if spec == "none":
        return None
    # Written by a thread of their own: a sink that blocks never holds the vCPU.
    if spec == "stdio":
        return BufferedOutput(fd_writer(sys.stdout.fileno()))
    if spec.startswith("file:"):
        try:
            fd = os.open(spec[5:], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as exc:
            raise OptionError("-serial", f"cannot open {spec[5:]!r}: {exc.strerror}") from None
        return BufferedOutput(fd_writer(fd))
    raise OptionError("-serial", f"{spec!r} is not stdio, file:PATH or none")


Extension = Callable[["Machine", "QmpServer | None", argparse.Namespace], "int | None"]
"""A layer above the VMM that adds to ``kvmmem run`` (migration: its QMP
commands and ``-incoming``): called once the machine is built and its QMP
server listens, before the vCPU runs; an int ends the run with that status."""


def main(argv: Sequence[str], extensions: Sequence[Extension] = ()) -> int:
    """Parse, build the machine, run it; the guest's exit status is ours
    (0 when SIGINT, SIGTERM or SIGHUP ended it, as in QEMU)."""
    args = parse_args(argv)
    if args.incoming is not None and not extensions:
        print("kvmmem run: -incoming: migration is not available here", file=sys.stderr)
        return 2
    signals = HostSignals()
    # log calls never wait on stderr (the vCPU may hold Machine.lock); created after
    # the host signals are blocked, so that its thread does not take them either
    logs = StderrLog()
    try:
        return _build_and_run(args, signals, extensions)
    finally:
        signals.close()
        logs.close()


def _build_and_run(args: argparse.Namespace, signals: HostSignals,
                   extensions: Sequence[Extension] = ()) -> int:
    from kvmmem.kvm import KvmError
    from kvmmem.vmm.machine import Machine

    try:
        config = parse_machine(args, _serial_sink(args.serial))
        qmp_path, qmp_wait = qmp_option(args.qmp) if args.qmp else (None, False)
        try:
            machine = Machine(config)
        except Exception as exc:
            option = _option_of(exc)
            if option is None:
                raise
            raise OptionError(option, str(exc)) from None
    except (OptionError, KvmError, ValueError, OSError) as exc:
        if signals.received is not None:    # SIGTERM while building (waiting on a back-end,
            return 0                        # say): QEMU's shutdown, its one line said already
        print(f"kvmmem run: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, OptionError) else 1
    server = None
    try:
        signals.attach(machine, None)           # from now on a signal stops the machine
        if qmp_path is not None:
            from kvmmem.vmm.qmp import QmpServer

            server = QmpServer(machine, qmp_path)
            try:
                server.start()
            except (ValueError, OSError) as exc:
                server = None
                print(f"kvmmem run: -qmp: {exc}", file=sys.stderr)
                return 2
        signals.attach(machine, server)
        for extension in extensions:
            status = extension(machine, server, args)
            if status is not None:
                return status
        if server is not None and qmp_wait:
            # QEMU's tcp_chr_wait_connected(): nothing runs until a client is
            # there; a host signal meanwhile stops the machine, which then
            # returns at once.
            print(f"kvmmem run: -qmp: waiting for connection on: unix:{qmp_path},server=on",
                  file=sys.stderr, flush=True)
            server.wait_for_client(lambda: machine.stop_requested)
        return machine.run()
    finally:
        if server is not None:
            server.close()
        machine.close()
        if isinstance(config.serial, BufferedOutput):
            config.serial.close()


def _option_of(exc: Exception) -> str | None:
    """The option a machine-building error comes from, None for a host
    problem (KVM missing, say). The machine is built from the options that
    parse_machine checked, so what is left are the rules of the parts: the
    boot layout (-kernel, or -append for the command line), the RAM mapping
    (-m), and a device that does not fit or cannot be realized (-device,
    a vhost-user device next to memory its back-end cannot map included)."""
    from kvmmem.devices.memory_device import MemoryDeviceError
    from kvmmem.devices.virtio_mem_props import VirtioMemPropertyError
    from kvmmem.memory.host import HostMemoryError
    from kvmmem.vhost.backends import UnsharedMemoryError
    from kvmmem.vmm.boot import BootError

    if isinstance(exc, BootError):
        return "-append" if "command line" in str(exc) else "-kernel"
    if isinstance(exc, HostMemoryError):
        return "-m" if "'pc.ram'" in str(exc) else "-device"
    if isinstance(exc, (MemoryDeviceError, VirtioMemPropertyError, UnsharedMemoryError)):
        return "-device"
    return None


def qmp_option(spec: str) -> tuple[str, bool]:
    """``-qmp unix:PATH[,server=on][,wait=on|off]``: the socket path, and whether
    the VM waits for the first client before it starts (QEMU's ``wait``, on by
    default for a server socket)."""
    opts = parse_keyval("-qmp", spec, "path")
    if "path" not in opts:
        raise OptionError("-qmp", "no socket given: the first item must be unix:PATH")
    path = opts.pop("path")
    if not path.startswith("unix:") or len(path) == 5:
        raise OptionError("-qmp", "only unix:PATH sockets are supported")
    for key, value in opts.items():
        if key not in ("server", "wait"):
            raise OptionError("-qmp", f"unknown key {key!r}")
        _bool("-qmp", key, value)
    if not _bool("-qmp", "server", opts.get("server", "on")):
        raise OptionError("-qmp", "kvmmem only listens (server=on)")
    return path[5:], _bool("-qmp", "wait", opts.get("wait", "on"))
