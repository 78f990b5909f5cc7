"""The QOM tree QMP shows (qom-list, qom-get): every -object with its own type,
the -machine memory-backend link, vhost-user-blk devices (issue 20, item 10).

A real machine on real KVM, built from a command line, with a real
qemu-storage-daemon behind its disk; the monitor's commands are called directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from vhost_helpers import start_backend

from kvmmem.vmm.cli import parse_args, parse_machine
from kvmmem.vmm.machine import Machine
from kvmmem.vmm.qmp_commands import MachineMonitor

pytestmark = [pytest.mark.kvm, pytest.mark.vhost]


def test_qom_lists_every_backend_the_ram_backend_and_the_disk(guest_elf: Path,
                                                              tmp_path: Path) -> None:
    backend = start_backend(tmp_path)
    cfg = parse_machine(parse_args([
        "-kernel", str(guest_elf), "-m", "256M,maxmem=4G",
        "-object", "memory-backend-memfd,id=ram,size=256M", "-machine", "memory-backend=ram",
        "-object", "memory-backend-memfd,id=mem0,size=2G,seal=off",
        "-object", "memory-backend-ram,id=spare,size=1G,share=on",
        "-device", "virtio-mem,id=vmem0,memdev=mem0",
        "-chardev", f"socket,id=c0,path={backend.socket}",
        "-device", "vhost-user-blk,chardev=c0,id=disk0"]), None)
    machine = Machine(cfg)
    monitor = MachineMonitor(machine, lambda event: None)

    def qom(command: str, **args: Any) -> Any:
        return monitor.execute(command, args)

    try:
        objects = {p["name"]: p["type"] for p in qom("qom-list", path="/objects")
                   if p["name"] != "type"}
        # before: only the virtio-mem memdev, as memory-backend-ram
        assert objects == {"ram": "child<memory-backend-memfd>",
                           "mem0": "child<memory-backend-memfd>",
                           "spare": "child<memory-backend-ram>"}
        assert qom("qom-get", path="/objects/mem0", property="type") == "memory-backend-memfd"
        assert qom("qom-get", path="/objects/mem0", property="seal") is False
        assert qom("qom-get", path="/objects/ram", property="seal") is True
        assert qom("qom-get", path="/objects/spare", property="share") is True
        assert qom("qom-get", path="/objects/ram", property="size") == 256 << 20
        assert qom("qom-get", path="/machine", property="memory-backend") == "/objects/ram"
        peripherals = {p["name"]: p["type"] for p in qom("qom-list", path="/machine/peripheral")
                       if p["name"] != "type"}
        assert peripherals == {"vmem0": "child<virtio-mem>", "disk0": "child<vhost-user-blk>"}
        assert qom("qom-get", path="disk0", property="chardev") == "c0"
        assert qom("qom-get", path="/machine/peripheral/disk0", property="queue-size") == 128
    finally:
        machine.close()
        backend.kill()
