"""Which kvmmem code one virtio-mem request runs, traced with ``sys.setprofile``.

A real VM (``/dev/kvm``) gets a 4 GiB ``dynamic`` virtio-mem device of 1 GiB
memslots, plugged into ``MachineMemory`` as ``kvmmem run`` does. Three
requests are traced from ``VirtioMem.handle`` down to the ioctl and back:

- PLUG that maps a new memslot (the first block of memslot 1);
- PLUG inside a mapped memslot (the second block of memslot 1);
- UNPLUG that empties one (both blocks of memslot 1: it is unmapped).

For each it prints the kvmmem functions run (distinct, and calls), the
modules they live in, the module-to-module hops (a call or a return whose
caller and callee are in different modules), the hops between two modules of
``kvmmem.devices`` (the device's own back and forth), and the calls into
``kvmmem.vmm`` (a device that calls up into the machine).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import FrameType
from typing import Any

from kvmmem.devices.memslot_policy import MemslotMode
from kvmmem.devices.virtio_mem import VirtioMem, VirtioMemProps
from kvmmem.devices.virtio_mem_proto import Request, RequestType, Response, ResponseType
from kvmmem.kvm import Kvm
from kvmmem.memory import HostMemory
from kvmmem.vmm.machine_memory import MachineMemory

GIB = 1 << 30
DEVICES = "kvmmem.devices"
VMM = "kvmmem.vmm"


@dataclass
class Trace:
    """What one request ran, as counted by :func:`trace`."""

    request: str
    functions: int              # distinct kvmmem functions
    calls: int                  # kvmmem function calls
    modules: int                # distinct kvmmem modules
    module_hops: int            # calls and returns that cross a module boundary
    devices_hops: int           # of those, between two modules of kvmmem.devices
    devices_boundaries: int     # distinct (caller module, callee module) pairs inside devices
    vmm_calls: int              # calls into kvmmem.vmm
    module_list: list[str]
    devices_pairs: list[str]


def _module(frame: FrameType) -> str | None:
    name = frame.f_globals.get("__name__", "")
    return name if isinstance(name, str) and name.startswith("kvmmem") else None


def trace(label: str, fn: Callable[[], Any]) -> Trace:
    """Run ``fn`` under ``sys.setprofile`` and count its kvmmem calls and hops."""
    functions: set[tuple[str, str, int]] = set()
    modules: Counter[str] = Counter()
    hops = dev_hops = vmm_calls = calls = 0
    dev_pairs: set[tuple[str, str]] = set()

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal hops, dev_hops, vmm_calls, calls
        if event not in ("call", "return"):
            return
        callee = _module(frame)
        if callee is None:
            return
        back = frame.f_back
        caller = _module(back) if back is not None else None
        if event == "call":
            calls += 1
            code = frame.f_code
            functions.add((callee, code.co_qualname, code.co_firstlineno))
            modules[callee] += 1
            if callee.startswith(VMM) and caller is not None and not caller.startswith(VMM):
                vmm_calls += 1
        if caller is None or caller == callee:
            return
        hops += 1
        if caller.startswith(DEVICES) and callee.startswith(DEVICES):
            dev_hops += 1
            if event == "call":
                dev_pairs.add((caller, callee))

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return Trace(label, len(functions), calls, len(modules), hops, dev_hops, len(dev_pairs),
                 vmm_calls, sorted(modules),
                 sorted(f"{a.rsplit('.', 1)[1]}->{b.rsplit('.', 1)[1]}" for a, b in dev_pairs))


def _ack(dev: VirtioMem, request: bytes) -> None:
    raw = dev.handle(0, request, 10)
    resp = Response.parse(raw) if raw is not None else None
    if resp is None or resp.type is not ResponseType.ACK:
        raise RuntimeError(f"{Request.parse(request)} answered {resp}")


def run() -> list[Trace]:
    """The three traced requests on a real VM (see the module docstring)."""
    size = 4 * GIB
    with Kvm() as kvm, kvm.create_vm() as vm:
        machine = MachineMemory(vm, GIB, maxmem=size + 4 * GIB)
        dev = VirtioMem(VirtioMemProps(id="vmem0", memdev=HostMemory(size, "mem0"),
                                       requested_size=size, memslots=MemslotMode.DYNAMIC))
        try:
            machine.plug(dev)
            if dev.memslot_size != GIB:
                raise RuntimeError(f"expected 1 GiB memslots, the device got {dev.memslot_size:#x}")
            bs, base = dev.block_size, dev.addr + GIB
            # Warm every path once (first-call costs, caches), then restore.
            _ack(dev, Request(RequestType.PLUG, base, 2).pack())
            _ack(dev, Request(RequestType.UNPLUG, base, 2).pack())
            slots = vm.used_memslots
            cases = [
                ("PLUG mapping a new memslot", Request(RequestType.PLUG, base, 1), slots + 1),
                ("PLUG inside a mapped memslot", Request(RequestType.PLUG, base + bs, 1), slots + 1),
                ("UNPLUG emptying a memslot", Request(RequestType.UNPLUG, base, 2), slots),
            ]
            out = []
            for label, req, want in cases:
                answer: list[bytes | None] = []
                out.append(trace(label, functools.partial(_send, dev, req.pack(), answer)))
                if answer != [Response.ack().pack()]:
                    raise RuntimeError(f"{label}: answered {answer}")
                if vm.used_memslots != want:
                    raise RuntimeError(f"{label}: {vm.used_memslots} memslots, expected {want}")
            return out
        finally:
            machine.close()
            dev.memdev.close()


def _send(dev: VirtioMem, raw: bytes, answer: list[bytes | None]) -> None:
    answer.append(dev.handle(0, raw, 10))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--modules", action="store_true", help="list the modules of each request")
    args = parser.parse_args(argv)
    traces = run()
    if args.json:
        print(json.dumps([asdict(t) for t in traces], indent=2))
        return 0
    print("| request | functions | calls | modules | module hops | hops inside devices/ "
          "| module pairs inside devices/ | calls into vmm/ |")
    print("|---|---|---|---|---|---|---|---|")
    for t in traces:
        print(f"| {t.request} | {t.functions} | {t.calls} | {t.modules} | {t.module_hops} "
              f"| {t.devices_hops} | {t.devices_boundaries} | {t.vmm_calls} |")
    if args.modules:
        for t in traces:
            print(f"{t.request}: {', '.join(t.module_list)}")
            print(f"  module pairs inside devices/: {', '.join(t.devices_pairs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
