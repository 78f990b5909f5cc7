"""The QMP commands of a kvmmem machine, named and answered as QEMU does.

:class:`MachineMonitor` is what a QMP session talks to: a table of commands
with QAPI-style argument checks, a small QOM tree (``/machine/peripheral/<id>``
for each virtio-mem device, ``/objects/<memdev>`` for its memory), the HMP
``info`` commands, and the events the machine raises. It runs commands in
the server's thread and takes ``machine.lock`` around anything the vCPU
thread also touches; events go out through the ``emit`` function it is
given, which must be safe to call from any thread.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvmmem import __version__
from kvmmem.devices.notifier import Notifier
from kvmmem.devices.virtio_mem_props import VirtioMemPropertyError
from kvmmem.vmm.event_throttle import QEMU_RATES, EventThrottle, Rate
from kvmmem.vmm.qmp_protocol import ErrorClass, QmpError, check_arguments, has_type

if TYPE_CHECKING:
    from kvmmem.devices.virtio_mem import VirtioMem
    from kvmmem.vmm.machine import Machine
    from kvmmem.vmm.unplugged import UnpluggedAccess


EmitFn = Callable[[str, "dict[str, Any] | None"], None]
PERIPHERAL = "/machine/peripheral"
OBJECTS = "/objects"
UNPLUGGED_ACCESS_EVENT = "X_KVMMEM_UNPLUGGED_ACCESS"
EVENT_RATES = {**QEMU_RATES, UNPLUGGED_ACCESS_EVENT: Rate(1.0)}
"""Events sent at most once a second (per device for size changes), as QEMU does."""


@dataclass(frozen=True)
class Command:
    """One QMP command: its handler and its arguments (name -> type)."""

    name: str
    run: Callable[[dict[str, Any]], Any]
    params: Mapping[str, str] = field(default_factory=dict)


# -- QOM -------------------------------------------------------------------

@dataclass(frozen=True)
class QomProperty:
    """A QOM property: its QEMU type name, a getter, a setter if writable."""

    type: str
    get: Callable[[], Any]
    set: Callable[[Any], None] | None = None


@dataclass(frozen=True)
class QomObject:
    """An object of the QOM tree with its properties (children included)."""

    path: str
    typename: str
    properties: dict[str, QomProperty]


# virtio-mem properties shown through QOM, with QEMU's type names; only
# requested-size can change while the machine runs.
_VIRTIO_MEM_TYPES = {
    "memdev": "link<memory-backend>", "memaddr": "uint64", "node": "uint32",
    "block-size": "size", "requested-size": "size", "size": "size", "max-size": "size",
    "usable-region-size": "size", "prealloc": "bool", "unplugged-inaccessible": "bool",
    "memslots": "string", "protect": "string", "max-memslots": "uint32",
    "merge-delay": "uint32",
}


def version_info() -> dict[str, Any]:
    """``query-version``'s reply (and the greeting's): kvmmem's own version
    in QEMU's shape, kvmmem named in ``package``."""
    parts = [int(p) if p.isdigit() else 0 for p in __version__.split(".")[:3]]
    major, minor, micro = (parts + [0, 0, 0])[:3]
    return {"qemu": {"major": major, "minor": minor, "micro": micro},
            "package": f"kvmmem {__version__}"}


class MachineMonitor:
    """The QMP commands and events of one :class:`Machine`."""

    def __init__(self, machine: Machine, emit: EmitFn) -> None:
        self.machine = machine
        self.emit = emit
        self.shut_down = False
        self._shutdown_lock = threading.Lock()
        self._qmp_reset_pending = False
        self._subscribed: list[tuple[Notifier[Any], Callable[[Any], None]]] = []
        self._stopped_on_error = False
        self._throttle: EventThrottle | None = None
        self._stop_on_internal_error: bool | None = None     # the machine's, before attach
        commands = [
            Command("qmp_capabilities", self._qmp_capabilities, {"*enable": "[str]"}),
            Command("query-commands", lambda a: [{"name": n} for n in sorted(self.commands)]),
            Command("query-version", lambda a: version_info()),
            Command("query-status", lambda a: {"status": self.status,
                                               "running": self.status == "running"}),
            Command("query-memory-devices", self._query_memory_devices),
            Command("x-query-memslots", self._query_memslots),
            Command("x-query-memslot-consumers",
                    lambda a: self._locked(self.machine.vhost.consumers)),
            Command("qom-list", self._qom_list, {"path": "str"}),
            Command("qom-get", self._qom_get, {"path": "str", "property": "str"}),
            Command("qom-set", self._qom_set, {"path": "str", "property": "str", "value": "any"}),
            Command("human-monitor-command", self._hmp_command,
                    {"command-line": "str", "*cpu-index": "int"}),
            Command("stop", self._stop),
            Command("cont", self._cont),
            Command("system_reset", self._system_reset),
            Command("quit", self._quit),
        ]
        self.commands = {c.name: c for c in commands}

    def execute(self, name: str, args: dict[str, Any]) -> Any:
        """Run one command; raise QmpError when it is unknown or fails."""
        command = self.commands.get(name)
        if command is None:
            raise QmpError(f"The command {name} has not been found", ErrorClass.COMMAND_NOT_FOUND)
        check_arguments(command.params, args)
        result = command.run(args)
        return {} if result is None else result

    @property
    def status(self) -> str:
        if self.shut_down:
            return "shutdown"
        if self.machine.internal_error is not None:
            return "internal-error"
        return "paused" if self.machine.paused else "running"

    # -- events ---------------------------------------------------------------

    def attach(self) -> None:
        """Subscribe to the events QMP reports, after any observer already there."""
        self._throttle = EventThrottle(self.emit, EVENT_RATES)
        for dev in self.machine.devices.values():
            self._subscribe(dev.size_change_notifiers, self._size_observer(dev))
        self._subscribe(self.machine.unplugged_access_notifiers, self._unplugged_access)
        self._subscribe(self.machine.reset_notifiers, self._reset)
        self._subscribe(self.machine.internal_error_notifiers, self._internal_error)
        self._stop_on_internal_error = self.machine.stop_on_internal_error
        self.machine.stop_on_internal_error = True     # a monitor can reset or quit it

    def detach(self) -> None:
        """Stop raising events: unsubscribe."""
        for notifiers, observer in self._subscribed:
            notifiers.remove(observer)
        self._subscribed.clear()
        if self._stop_on_internal_error is not None:
            self.machine.stop_on_internal_error = self._stop_on_internal_error
            self._stop_on_internal_error = None
        if self._throttle is not None:
            self._throttle.close()
            self._throttle = None

    def _emit_throttled(self, event: str, data: dict[str, Any]) -> None:
        throttle = self._throttle
        if throttle is not None:
            throttle.emit(event, data)

    def _subscribe(self, notifiers: Notifier[Any], observer: Callable[[Any], None]) -> None:
        self._subscribed.append((notifiers, notifiers.add(observer)))

    def _size_observer(self, dev: VirtioMem) -> Callable[[int], None]:
        return lambda size: self._size_changed(dev, size)

    def _size_changed(self, dev: VirtioMem, size: int) -> None:
        self._emit_throttled("MEMORY_DEVICE_SIZE_CHANGE",
                             {"id": dev.id, "size": size, "qom-path": f"{PERIPHERAL}/{dev.id}"})

    def _unplugged_access(self, access: UnpluggedAccess) -> None:
        data: dict[str, Any] = {}
        if access.device:
            data.update({"device": access.device, "qom-path": f"{PERIPHERAL}/{access.device}"})
        data.update({"address": access.address, "vcpu": access.vcpu, "write": access.is_write})
        self._emit_throttled(UNPLUGGED_ACCESS_EVENT, data)

    def _reset(self, resets: int) -> None:
        """The machine was reset (vCPU thread): raise RESET."""
        host, self._qmp_reset_pending = self._qmp_reset_pending, False
        self.emit("RESET", {"guest": not host,
                            "reason": "host-qmp-system-reset" if host else "guest-reset"})
        if self._stopped_on_error and not self.machine.paused:    # running again
            self._stopped_on_error = False
            self.emit("RESUME", None)

    def _internal_error(self, message: str) -> None:
        """The vCPU stopped on an error: QEMU's vm_stop(RUN_STATE_INTERNAL_ERROR)
        sends STOP; query-status then says internal-error."""
        self._stopped_on_error = True
        self.emit("STOP", None)

    def notify_shutdown(self, guest: bool = True, reason: str = "guest-shutdown") -> None:
        """The machine stopped: raise SHUTDOWN once (any thread: a host
        signal's and the run loop's end may race)."""
        with self._shutdown_lock:
            if self.shut_down:
                return
            self.shut_down = True
        self.emit("SHUTDOWN", {"guest": guest, "reason": reason})

    # -- commands ---------------------------------------------------------------

    def _qmp_capabilities(self, args: dict[str, Any]) -> None:
        for capability in args.get("enable", []):
            if capability == "oob":
                raise QmpError("Capability oob not available")
            raise QmpError(f"Parameter 'enable' does not accept value '{capability}'")

    def _query_memory_devices(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        with self.machine.lock:
            infos = [dev.properties() for dev in self.machine.devices.values()]
        keys = ("id", "memaddr", "requested-size", "size", "max-size", "block-size", "node")
        return [{"type": "virtio-mem",
                 "data": {**{k: p[k] for k in keys}, "memdev": f"{OBJECTS}/{p['memdev']}"}}
                for p in infos]

    def _query_memslots(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        """Every KVM memslot of the VM, with the region and device it maps."""
        with self.machine.lock:
            memory = self.machine.memory
            records = memory.kvm_listener.memslots()
            owners = {rec.slot: memory.owner(rec.guest_phys_addr) for rec in records}
        result = []
        for rec in sorted(records, key=lambda r: r.guest_phys_addr):
            slot: dict[str, Any] = {"slot": rec.slot, "start": rec.guest_phys_addr,
                                    "size": rec.memory_size, "host-addr": rec.userspace_addr,
                                    "flags": rec.flags, "region": rec.region}
            if rec.alias is not None:
                slot["alias"] = rec.alias
            device = owners[rec.slot]
            if device:
                slot["device"] = device
            result.append(slot)
        return result

    def _stop(self, args: dict[str, Any]) -> None:
        if not self.shut_down and not self.machine.paused:
            self.machine.pause()
            self.emit("STOP", None)

    def _cont(self, args: dict[str, Any]) -> None:
        if self.shut_down or self.machine.internal_error is not None:
            raise QmpError("Resetting the Virtual Machine is required")
        if self.machine.paused:
            self.machine.resume()
            self.emit("RESUME", None)

    def _system_reset(self, args: dict[str, Any]) -> None:
        if self.shut_down:
            raise QmpError("The machine has shut down; it cannot be reset")
        self._qmp_reset_pending = True
        self.machine.request_reset()

    def _quit(self, args: dict[str, Any]) -> None:
        if not self.shut_down:           # else the run loop is over: nothing to stop
            self.notify_shutdown(guest=False, reason="host-qmp-quit")
            self.machine.shutdown(0)

    # -- QOM ----------------------------------------------------------------------

    def _tree(self) -> dict[str, QomObject]:
        objects: dict[str, QomObject] = {}

        def add(path: str, typename: str, props: dict[str, QomProperty],
                children: Mapping[str, str] = {}) -> None:
            props = {"type": QomProperty("string", lambda: typename), **props}
            for name, child_type in children.items():
                child = f"{path.rstrip('/')}/{name}"
                props[name] = QomProperty(f"child<{child_type}>", functools.partial(str, child))
            objects[path] = QomObject(path, typename, props)

        machine = self.machine
        devices = dict(machine.devices)
        disks = {i: b.props for i, b in machine.vhost.devices.items()}
        # -object backends with the type they were given as; memory a device
        # made for itself (no -object) by what it is
        backends = dict(machine.config.objects)
        for dev in devices.values():
            if not any(host is dev.memdev for _, host in backends.values()):
                kind = "memory-backend-memfd" if dev.memdev.fd >= 0 else "memory-backend-ram"
                backends[dev.memdev.name] = (kind, dev.memdev)
        add("/", "container", {}, {"machine": "kvmmem-pc-machine", "objects": "container"})
        machine_props: dict[str, QomProperty] = {}
        ram_id = next((i for i, (_, host) in backends.items()
                       if host is machine.config.ram_backend), None)
        if ram_id is not None:           # -machine memory-backend=ID
            machine_props["memory-backend"] = QomProperty(
                "link<memory-backend>", functools.partial(str, f"{OBJECTS}/{ram_id}"))
        add("/machine", "kvmmem-pc-machine", machine_props, {"peripheral": "container"})
        add(PERIPHERAL, "container", {}, {**{i: "virtio-mem" for i in devices},
                                          **{i: "vhost-user-blk" for i in disks}})
        add(OBJECTS, "container", {}, {i: kind for i, (kind, _) in backends.items()})
        for dev_id, dev in devices.items():
            add(f"{PERIPHERAL}/{dev_id}", "virtio-mem", self._device_properties(dev))
        for disk_id, disk in disks.items():
            add(f"{PERIPHERAL}/{disk_id}", "vhost-user-blk", {
                "chardev": QomProperty("str", functools.partial(str, disk.chardev)),
                "num-queues": QomProperty("uint16", functools.partial(int, disk.num_queues)),
                "queue-size": QomProperty("uint32", functools.partial(int, disk.queue_size))})
        for name, (kind, mem) in backends.items():
            mem_props = {"size": QomProperty("uint64", functools.partial(getattr, mem, "size")),
                         "share": QomProperty("bool", functools.partial(getattr, mem, "shared"))}
            if kind == "memory-backend-memfd":
                mem_props["seal"] = QomProperty("bool", functools.partial(getattr, mem, "sealed"))
                mem_props["hugetlb"] = QomProperty("bool", functools.partial(bool, False))
            add(f"{OBJECTS}/{name}", kind, mem_props)
        return objects

    def _device_properties(self, dev: VirtioMem) -> dict[str, QomProperty]:
        def getter(name: str) -> Callable[[], Any]:
            def get() -> Any:
                with self.machine.lock:
                    value = dev.properties()[name]
                return f"{OBJECTS}/{value}" if name == "memdev" else value
            return get

        props = {name: QomProperty(kind, getter(name)) for name, kind in _VIRTIO_MEM_TYPES.items()}
        props["requested-size"] = QomProperty("size", getter("requested-size"),
                                              lambda value: self._set_requested_size(dev, value))
        props["memslot-size"] = QomProperty("size", lambda: self._locked(lambda: dev.memslot_size))
        props["mapped-memslots"] = QomProperty(
            "uint32", lambda: self._locked(lambda: dev.nb_memslots))
        return props

    def _locked(self, read: Callable[[], Any]) -> Any:
        with self.machine.lock:
            return read()

    def _set_requested_size(self, dev: VirtioMem, value: Any) -> None:
        if not has_type(value, "int") or value < 0:
            raise QmpError("Invalid parameter type for 'requested-size', expected: size")
        if self.shut_down:
            raise QmpError("The machine has shut down")
        with self.machine.lock:
            try:
                dev.set_requested_size(value)
            except VirtioMemPropertyError as exc:
                raise QmpError(str(exc)) from None

    def _resolve(self, path: str) -> QomObject:
        """An absolute path, or a partial one that matches one object (as QEMU)."""
        tree = self._tree()
        key = path.rstrip("/") or "/"
        if path.startswith("/"):
            found = tree.get(key)
            if found is not None:
                return found
        elif path:
            matches = [obj for p, obj in tree.items() if p.endswith("/" + key)]
            if len(matches) > 1:
                raise QmpError(f"Path '{path}' is ambiguous")
            if matches:
                return matches[0]
        raise QmpError(f"Device '{path}' not found", ErrorClass.DEVICE_NOT_FOUND)

    def _property(self, args: dict[str, Any]) -> tuple[QomObject, str, QomProperty]:
        obj, name = self._resolve(args["path"]), args["property"]
        prop = obj.properties.get(name)
        if prop is None:
            raise QmpError(f"Property '{obj.typename}.{name}' not found")
        return obj, name, prop

    def _qom_list(self, args: dict[str, Any]) -> list[dict[str, str]]:
        obj = self._resolve(args["path"])
        return [{"name": name, "type": prop.type} for name, prop in obj.properties.items()]

    def _qom_get(self, args: dict[str, Any]) -> Any:
        return self._property(args)[2].get()

    def _qom_set(self, args: dict[str, Any]) -> None:
        obj, name, prop = self._property(args)
        if prop.set is None:
            raise QmpError(f"Property '{obj.typename}.{name}' is not writable")
        prop.set(args["value"])

    # -- HMP ------------------------------------------------------------------------

    def _hmp_command(self, args: dict[str, Any]) -> str:
        if args.get("cpu-index", 0) != 0:
            raise QmpError(f"Invalid CPU index {args['cpu-index']} (the machine has vCPU 0)")
        return self.hmp(args["command-line"]).replace("\n", "\r\n")

    def hmp(self, line: str) -> str:
        """One HMP command line, answered as text (errors too, as in QEMU)."""
        words = line.split()
        if not words:
            return ""
        if words[0] == "info" and len(words) > 1:
            return self._hmp_info(words[1], words[2:])
        if words[0] == "info":
            return _HMP_INFO_HELP
        if words[0] in ("help", "?"):
            return _HMP_HELP
        if words[0] in _HMP_ACTIONS and len(words) == 1:
            try:
                self.execute(_HMP_ACTIONS[words[0]], {})
            except QmpError as exc:
                return f"Error: {exc.desc}\n"
            return ""
        return f"unknown command: '{words[0]}'\n"

    def _hmp_info(self, what: str, options: list[str]) -> str:
        if what == "mtree":
            unknown = [o for o in options if o != "-f"]
            if unknown:
                return f"info mtree: unsupported option '{unknown[0]}' (kvmmem knows -f)\n"
            with self.machine.lock:
                return self.machine.memory.info_mtree(flatview="-f" in options)
        if options:
            return f"info {what}: too many arguments\n"
        if what == "memory-devices":
            return "".join(_format_memory_device(d["data"])
                           for d in self._query_memory_devices({}))
        if what == "status":             # QEMU's hmp_info_status
            status = self.status
            if status in ("running", "paused"):
                return f"VM status: {status}\n"
            return f"VM status: paused ({status})\n"
        if what == "version":
            return f"{__version__} (kvmmem {__version__})\n"
        return f"unknown command: 'info {what}'\n"


# HMP help in QEMU's layout ("name args -- text"), which qmp-shell -H parses.
_HMP_ACTIONS = {"stop": "stop", "cont": "cont", "c": "cont", "system_reset": "system_reset",
                "quit": "quit", "q": "quit"}
_HMP_HELP = ("cont|c  -- resume emulation\n"
             "help|? [cmd] -- show the help\n"
             "info [subcommand] -- show various information about the system state\n"
             "quit|q  -- quit the emulator\n"
             "stop  -- stop emulation\n"
             "system_reset  -- reset the system\n")
_HMP_INFO_HELP = ("info memory-devices  -- show memory devices\n"
                  "info mtree [-f] -- show memory tree (-f: the flat views)\n"
                  "info status  -- show the current VM status (running|paused)\n"
                  "info version  -- show the version of kvmmem\n")


def _format_memory_device(info: dict[str, Any]) -> str:
    """QEMU's ``info memory-devices`` block for one virtio-mem device."""
    return (f"Memory device [virtio-mem]: \"{info['id']}\"\n"
            f"  memaddr: {info['memaddr']:#x}\n"
            f"  node: {info['node']}\n"
            f"  requested-size: {info['requested-size']}\n"
            f"  size: {info['size']}\n"
            f"  max-size: {info['max-size']}\n"
            f"  block-size: {info['block-size']}\n"
            f"  memdev: {info['memdev']}\n")
