"""``kvmmem run``: start a VM from the command line, spelled as QEMU's.

    kvmmem run -m 4G,maxmem=1028G,slots=4 \\
        -object memory-backend-ram,id=mem0,size=500G \\
        -device virtio-mem,id=vmem0,memdev=mem0,requested-size=2G,memslots=dynamic \\
        -kernel build/guest/guest.elf -append "kvmmem.steps=3" -serial stdio

A bad option is refused with one line that names it and says why.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from kvmmem.devices.virtio_mem_props import VirtioMemProps
from kvmmem.memory import HostMemory
from kvmmem.vmm.units import parse_size

DEVICE_DRIVERS = ("virtio-mem", "virtio-mem-device")
VHOST_DRIVERS = ("vhost-user-blk", "vhost-user-blk-device")
BACKENDS = ("memory-backend-ram", "memory-backend-memfd")
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
    return result


def _size(option: str, key: str, value: str) -> int:
    try:
        return parse_size(value)
    except ValueError:
        raise OptionError(option, f"{key}={value!r} is not a size (examples: 512M, 2G)") from None


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
    p.add_argument("-object", action="append", default=[], metavar="memory-backend-ram,id=ID,size=SIZE")
    p.add_argument("-device", action="append", default=[], metavar="virtio-mem,id=ID,memdev=ID,...")
    p.add_argument("-chardev", action="append", default=[], metavar="socket,id=ID,path=PATH")
    p.add_argument("-machine", default=None, metavar="memory-backend=ID",
                   help="boot RAM from a -object memory backend (shared for vhost-user)")
    p.add_argument("-kernel", required=True, help="ELF64 kernel for the Linux 64-bit boot protocol")
    p.add_argument("-append", default="", help="kernel command line (after the devices)")
    p.add_argument("-serial", default="stdio", help="stdio, file:PATH or none")
    p.add_argument("-no-reboot", dest="no_reboot", action="store_true",
                   help="exit instead of resetting when the guest resets")
    p.add_argument("-qmp", default=None, metavar="unix:PATH,server=on,wait=off")
    return p


def parse_machine(args: argparse.Namespace, sink: Callable[[bytes], None] | None) -> Any:
    """Turn parsed options into a MachineConfig (HostMemory objects included)."""
    from kvmmem.vmm.machine import MachineConfig

    mem = parse_keyval("-m", args.m, "size")
    unknown = set(mem) - {"size", "maxmem", "slots"}
    if unknown:
        raise OptionError("-m", f"unknown key {sorted(unknown)[0]!r}")
    ram = _size("-m", "size", mem["size"])
    maxmem = _size("-m", "maxmem", mem["maxmem"]) if "maxmem" in mem else None
    try:
        slots = int(mem.get("slots", "0"))
    except ValueError:
        raise OptionError("-m", f"slots={mem['slots']!r} is not a number") from None
    backends = {}
    for text in args.object:
        obj = parse_keyval("-object", text, "qom-type")
        if obj["qom-type"] not in BACKENDS:
            raise OptionError("-object", f"{obj['qom-type']!r} is not one of {', '.join(BACKENDS)}")
        if "id" not in obj or "size" not in obj:
            raise OptionError("-object", f"{obj['qom-type']} needs id= and size=")
        shared = obj["qom-type"] == "memory-backend-memfd" or _bool("-object", "share",
                                                                      obj.get("share", "off"))
        backends[obj["id"]] = HostMemory(_size("-object", "size", obj["size"]), obj["id"],
                                         shared=shared)
    from kvmmem.vmm.cli_vhost import chardevs as _chardevs
    from kvmmem.vmm.cli_vhost import ram_backend, vhost_user_blk

    chardevs = _chardevs(args.chardev)
    ram_host = ram_backend(args.machine, backends, ram)
    devices: list[VirtioMemProps] = []
    vhost_devices: list[Any] = []
    for text in args.device:
        dev = parse_keyval("-device", text, "driver")
        driver = dev.pop("driver")
        if driver in VHOST_DRIVERS:
            vhost_devices.append(vhost_user_blk(dev, chardevs, len(vhost_devices)))
            continue
        if driver not in DEVICE_DRIVERS:
            raise OptionError("-device", f"only {', '.join(DEVICE_DRIVERS + VHOST_DRIVERS)} "
                              "are supported")
        devices.append(_virtio_mem(dev, backends))
    return MachineConfig(ram_size=ram, kernel=args.kernel, maxmem=maxmem, slots=slots,
                         cmdline=args.append, memory_devices=devices, serial=sink,
                         no_reboot=args.no_reboot, vhost_devices=vhost_devices,
                         ram_backend=ram_host)


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
        elif key in ("node", "max-memslots"):
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
    if spec == "stdio":
        out = sys.stdout.buffer
        return lambda data: (out.write(data), out.flush())  # type: ignore[func-returns-value]
    if spec.startswith("file:"):
        handle = open(spec[5:], "ab", buffering=0)
        return handle.write  # type: ignore[return-value]
    raise OptionError("-serial", f"{spec!r} is not stdio, file:PATH or none")


def main(argv: Sequence[str]) -> int:
    """Parse, build the machine, run it; the guest's exit status is ours."""
    from kvmmem.kvm import KvmError
    from kvmmem.vhost.frontend import VhostUserError
    from kvmmem.vmm.machine import Machine

    args = build_parser().parse_args(argv)
    try:
        config = parse_machine(args, _serial_sink(args.serial))
        qmp_path = _qmp_path(args.qmp) if args.qmp else None
        machine = Machine(config)
    except OptionError as exc:
        print(f"kvmmem run: {exc}", file=sys.stderr)
        return 2
    except (KvmError, ValueError, OSError, VhostUserError) as exc:
        print(f"kvmmem run: {exc}", file=sys.stderr)
        return 1
    server = None
    try:
        if qmp_path is not None:
            from kvmmem.vmm.qmp import QmpServer

            server = QmpServer(machine, qmp_path)
            try:
                server.start()
            except (ValueError, OSError) as exc:
                server = None
                print(f"kvmmem run: -qmp: {exc}", file=sys.stderr)
                return 2
        return machine.run()
    finally:
        if server is not None:
            server.close()
        machine.close()


def _qmp_path(spec: str) -> str:
    opts = parse_keyval("-qmp", spec, "path")
    path = opts.pop("path")
    if not path.startswith("unix:"):
        raise OptionError("-qmp", "only unix:PATH sockets are supported")
    for key, value in opts.items():
        if key not in ("server", "wait"):
            raise OptionError("-qmp", f"unknown key {key!r}")
        _bool("-qmp", key, value)
    if not _bool("-qmp", "server", opts.get("server", "on")):
        raise OptionError("-qmp", "kvmmem only listens (server=on)")
    return path[5:]
