"""``kvmmem run`` options for vhost-user devices, spelled as QEMU's:
``-chardev socket,id=ID,path=PATH``, ``-device vhost-user-blk,chardev=ID[,id=...]``
and ``-machine memory-backend=ID`` (boot RAM from a shared ``-object``)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from kvmmem.memory import HostMemory
from kvmmem.vmm.cli import OptionError, parse_keyval


def chardevs(specs: list[str]) -> dict[str, tuple[str, int]]:
    """``-chardev socket,id=ID,path=PATH[,reconnect=SECONDS]``: the socket path of
    each chardev, and how often to connect again after the peer went (0: never)."""
    result: dict[str, tuple[str, int]] = {}
    for text in specs:
        opts = parse_keyval("-chardev", text, "backend")
        if opts.pop("backend") != "socket":
            raise OptionError("-chardev", "only socket chardevs are supported")
        if "id" not in opts or "path" not in opts:
            raise OptionError("-chardev", "socket needs id= and path=")
        unknown = set(opts) - {"id", "path", "reconnect"}
        if unknown:
            raise OptionError("-chardev", f"unknown key {min(unknown)!r}")
        if opts["id"] in result:                        # QEMU's qemu_opts_create()
            raise OptionError("-chardev", f"Duplicate ID '{opts['id']}' for chardev")
        reconnect = opts.get("reconnect", "0")
        if not reconnect.isdigit() or int(reconnect) > 3600:
            raise OptionError("-chardev", f"reconnect={reconnect!r} is not a number of "
                                          "seconds in 0..3600")
        result[opts["id"]] = (opts["path"], int(reconnect))
    return result


def vhost_user_blk(dev: dict[str, str], chardevs: dict[str, tuple[str, int]], index: int,
                   in_use: Collection[str] = ()) -> Any:
    """One ``-device vhost-user-blk``; ``in_use`` are the chardevs other devices took."""
    from kvmmem.vhost.vhost_user_blk import VhostUserBlkProps

    chardev = dev.pop("chardev", None)
    if chardev is None:
        raise OptionError("-device", "vhost-user-blk needs chardev=")
    if chardev not in chardevs:
        raise OptionError("-device", f"chardev={chardev!r}: no -chardev with that id")
    if chardev in in_use:       # QEMU's qdev_prop_set_chr(): one front-end per chardev
        raise OptionError("-device", f"Property 'vhost-user-blk.chardev' can't take value "
                                     f"'{chardev}', it's in use")
    numbers = {}
    for key in ("num-queues", "queue-size"):
        if key in dev:
            try:
                numbers[key] = int(dev.pop(key), 0)
            except ValueError:
                raise OptionError("-device", f"{key} is not a number") from None
    dev_id = dev.pop("id", f"vhost-user-blk{index}")
    if dev:
        raise OptionError("-device", f"vhost-user-blk: unknown property {min(dev)!r}")
    try:
        path, reconnect = chardevs[chardev]
        return VhostUserBlkProps(dev_id, chardev, path,
                                 num_queues=numbers.get("num-queues", 1),
                                 queue_size=numbers.get("queue-size", 128), reconnect=reconnect)
    except ValueError as exc:
        raise OptionError("-device", str(exc)) from None


def ram_backend(spec: str, backends: dict[str, HostMemory], ram: int,
                busy: set[str]) -> HostMemory | None:
    """``-machine memory-backend=ID``: boot RAM is that backend (whose size must be
    -m's); it is then busy, no memory device may use it too. The other -machine
    keys are checked by the caller."""
    backend_id = parse_keyval("-machine", spec, "type").get("memory-backend")
    if backend_id is None:
        return None
    if backend_id not in backends:
        raise OptionError("-machine", f"memory-backend={backend_id!r}: no -object with that id")
    host = backends[backend_id]
    if host.size != ram:
        raise OptionError("-machine", f"memory-backend {backend_id!r} has {host.size} bytes "
                          f"but -m asks for {ram}")
    busy.add(backend_id)
    return host
