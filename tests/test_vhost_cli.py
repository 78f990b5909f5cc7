"""`kvmmem run` with a vhost-user-blk disk: QEMU's spelling, refusals, a real boot."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qmp_client import QmpClient
from test_cli import ROOT, config, run
from vhost_helpers import MiB, start_backend

from kvmmem.vmm.cli import OptionError

GiB, TiB = 1 << 30, 1 << 40


def test_vhost_options_build_the_config() -> None:
    cfg = config("-m", "1G,maxmem=9G", "-object", "memory-backend-memfd,id=ram,size=1G",
                 "-machine", "memory-backend=ram", "-object", "memory-backend-memfd,id=mem0,size=4G",
                 "-device", "virtio-mem,id=vmem0,memdev=mem0",
                 "-chardev", "socket,id=c0,path=/tmp/x.sock",
                 "-device", "vhost-user-blk,chardev=c0,id=disk0,queue-size=64")
    assert cfg.ram_backend.name == "ram" and cfg.ram_backend.fd >= 0
    [props] = cfg.vhost_devices
    assert (props.id, props.chardev, props.path, props.queue_size) == \
        ("disk0", "c0", "/tmp/x.sock", 64)
    assert cfg.memory_devices[0].memdev.fd >= 0
    cfg.ram_backend.close()
    cfg.memory_devices[0].memdev.close()


@pytest.mark.parametrize("argv,option,why", [
    (["-chardev", "file,id=c0,path=/x"], "-chardev", "only socket"),
    (["-chardev", "socket,id=c0"], "-chardev", "needs id= and path="),
    (["-device", "vhost-user-blk,id=d"], "-device", "needs chardev="),
    (["-device", "vhost-user-blk,chardev=nope"], "-device", "no -chardev with that id"),
    (["-chardev", "socket,id=c0,path=/x", "-device", "vhost-user-blk,chardev=c0,num-queues=2"],
     "-device", "serves one queue"),
    (["-chardev", "socket,id=c0,path=/x", "-device", "vhost-user-blk,chardev=c0,bootindex=1"],
     "-device", "unknown property"),
    (["-machine", "memory-backend=ram"], "-machine", "no -object with that id"),
    (["-object", "memory-backend-memfd,id=ram,size=2G", "-machine", "memory-backend=ram"],
     "-machine", "-m asks for"),
    # QEMU's qemu_opts_create(): chardev ids are unique
    (["-chardev", "socket,id=c0,path=/x", "-chardev", "socket,id=c0,path=/y"],
     "-chardev", "Duplicate ID 'c0' for chardev"),
    # QEMU's qdev_prop_set_chr(): a chardev serves one device (a second front-end
    # would wait on a back-end that serves one connection at a time)
    (["-chardev", "socket,id=c0,path=/x", "-device", "vhost-user-blk,chardev=c0,id=d0",
      "-device", "vhost-user-blk,chardev=c0,id=d1"],
     "-device", "Property 'vhost-user-blk.chardev' can't take value 'c0', it's in use"),
    # device ids are one namespace, whatever the driver
    (["-chardev", "socket,id=c0,path=/x", "-chardev", "socket,id=c1,path=/y",
      "-device", "vhost-user-blk,chardev=c0,id=d0", "-device", "vhost-user-blk,chardev=c1,id=d0"],
     "-device", "Duplicate ID 'd0' for device"),
    (["-object", "memory-backend-ram,id=mem0,size=1G", "-device", "virtio-mem,id=d0,memdev=mem0",
      "-chardev", "socket,id=c0,path=/x", "-device", "vhost-user-blk,chardev=c0,id=d0"],
     "-device", "Duplicate ID 'd0' for device"),
    (["-chardev", "socket,id=c0,path=/x", "-device", "vhost-user-blk,chardev=c0,id=d0",
      "-object", "memory-backend-ram,id=mem0,size=1G", "-device", "virtio-mem,id=d0,memdev=mem0"],
     "-device", "Duplicate ID 'd0' for device"),
])
def test_bad_vhost_options_are_refused(argv, option: str, why: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OptionError) as info:
        config("-m", "1G,maxmem=3G", *argv)
    assert info.value.option == option and why in str(info.value)


@pytest.mark.kvm
@pytest.mark.vhost
@pytest.mark.parametrize("memory,what", [
    ([], "guest RAM 'pc.ram' is not shared memory"),
    (["-object", "memory-backend-memfd,id=ram,size=512M", "-machine", "memory-backend=ram",
      "-object", "memory-backend-ram,id=mem0,size=1G", "-device", "virtio-mem,id=vmem0,memdev=mem0"],
     "memory device 'vmem0' memdev 'mem0' is not shared memory"),
])
def test_memory_that_is_not_shared_is_a_bad_option(tmp_path: Path, guest_elf: Path,
                                                   memory: list[str], what: str) -> None:
    """A vhost-user-blk device next to private memory is a bad -device: one line
    naming it, status 2, like every other option kvmmem run refuses."""
    backend = start_backend(tmp_path)
    try:
        out = run("-m", "512M,maxmem=2G", *memory, "-chardev", f"socket,id=c0,path={backend.socket}",
                  "-device", "vhost-user-blk,chardev=c0,id=disk0", "-kernel", str(guest_elf))
    finally:
        backend.kill()
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmmem run: -device: vhost-user-blk 'disk0': ")
    assert what in lines[0], out.stderr


@pytest.mark.kvm
@pytest.mark.vhost
def test_run_with_a_vhost_user_blk_disk_next_to_virtio_mem(tmp_path: Path, guest_elf: Path) -> None:
    backend = start_backend(tmp_path, size=16 * MiB)
    log = tmp_path / "serial.txt"
    try:
        out = run("-m", "512M,maxmem=8704M", "-object", "memory-backend-memfd,id=ram,size=512M",
                  "-machine", "memory-backend=ram",
                  "-object", "memory-backend-memfd,id=mem0,size=4G",
                  "-device", "virtio-mem,id=vmem0,memdev=mem0,requested-size=1G",
                  "-chardev", f"socket,id=c0,path={backend.socket}",
                  "-device", "vhost-user-blk,chardev=c0,id=disk0",
                  "-kernel", str(guest_elf), "-append", "kvmmem.steps=8", "-serial", f"file:{log}")
        assert backend.proc.poll() is None      # the back-end outlived its client
    finally:
        backend.kill()
    assert out.returncode == 1, out.stderr
    text = log.read_text()
    assert "virtio_mmio.device=512@0xd0000000:5 virtio_mmio.device=512@0xd0001000:6" in text
    assert "plugged=1073741824 requested=1073741824 ok" in text


@pytest.mark.kvm
def test_a_backend_that_is_not_there_is_refused_in_one_line(tmp_path: Path, guest_elf: Path) -> None:
    out = run("-m", "512M", "-object", "memory-backend-memfd,id=ram,size=512M",
              "-machine", "memory-backend=ram",
              "-chardev", f"socket,id=c0,path={tmp_path / 'none.sock'}",
              "-device", "vhost-user-blk,chardev=c0,id=disk0", "-kernel", str(guest_elf))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot connect to the vhost-user back-end" in lines[0], out.stderr


@pytest.mark.kvm
@pytest.mark.vhost
@pytest.mark.slow
def test_a_busy_backend_is_one_line_and_a_signal_while_waiting_for_it_exits_0(
        tmp_path: Path, guest_elf: Path) -> None:
    """qemu-storage-daemon serves one front-end at a time: while another holds
    it, the handshake times out. That is one line and status 1; a SIGTERM
    taken while waiting is QEMU's shutdown: its one line and status 0."""
    backend = start_backend(tmp_path)
    holder = socket.socket(socket.AF_UNIX)
    holder.connect(backend.socket)              # the daemon's one client, silent
    argv = [sys.executable, "-m", "kvmmem", "run", "-m", "512M",
            "-object", "memory-backend-memfd,id=ram,size=512M", "-machine", "memory-backend=ram",
            "-chardev", f"socket,id=c0,path={backend.socket}",
            "-device", "vhost-user-blk,chardev=c0,id=disk0", "-kernel", str(guest_elf)]
    try:
        waiting = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        signalled = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        time.sleep(2)                           # both are building their machine
        signalled.send_signal(signal.SIGTERM)
        _, waiting_err = waiting.communicate(timeout=120)
        _, signalled_err = signalled.communicate(timeout=120)
    finally:
        holder.close()
        backend.kill()
    lines = waiting_err.strip().splitlines()
    assert waiting.returncode == 1 and len(lines) == 1, waiting_err
    assert "GET_FEATURES failed" in lines[0], waiting_err
    lines = signalled_err.strip().splitlines()
    assert signalled.returncode == 0, signalled_err
    assert len(lines) == 1 and "terminating on signal 15" in lines[0], signalled_err


def _plugged(client: QmpClient, size: int) -> None:
    """Wait until the guest reports ``size`` plugged (the last size is always sent)."""
    while client.wait_event("MEMORY_DEVICE_SIZE_CHANGE")["data"]["size"] != size:
        pass


@pytest.mark.kvm
@pytest.mark.vhost
def test_the_readme_disk_next_to_virtio_mem_resets_and_ends_on_sigterm(
        tmp_path: Path, guest_elf: Path) -> None:
    """The README's vhost-user-blk command with a monitor: the budget it quotes,
    a system_reset with the back-end connected, and SIGTERM: one SHUTDOWN,
    the socket and its lock file removed, status 0."""
    backend = start_backend(tmp_path)
    qmp = tmp_path / "qmp.sock"
    vm = subprocess.Popen(
        [sys.executable, "-m", "kvmmem", "run", "-m", "4G,maxmem=1028G,slots=4",
         "-object", "memory-backend-memfd,id=ram,size=4G", "-machine", "memory-backend=ram",
         "-object", "memory-backend-memfd,id=mem0,size=1T",
         "-device", "virtio-mem,id=vmem0,memdev=mem0,requested-size=2G",
         "-chardev", f"socket,id=c0,path={backend.socket}",
         "-device", "vhost-user-blk,chardev=c0,id=disk0",
         "-kernel", str(guest_elf), "-serial", f"file:{tmp_path / 'serial.txt'}",
         "-qmp", f"unix:{qmp},server=on,wait=off"],
        stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not qmp.exists() and vm.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        client = QmpClient(qmp)
        for _ in range(2):                                  # booted, then after a reset
            _plugged(client, 2 * GiB)
            kvm, disk = client.execute("x-query-memslot-consumers")
            mapped = client.execute("qom-get", path="vmem0", property="mapped-memslots")
            slot = client.execute("qom-get", path="vmem0", property="memslot-size")
            count = TiB // slot
            assert disk["connected"] is True and mapped == 1
            assert (kvm["used"], kvm["reserved"]) == (disk["used"], disk["reserved"]) == \
                (2 + mapped, count - mapped)                # boot RAM below and above 4 GiB
            if "7.2" in backend.version():                  # the README's numbers
                assert (disk["limit"], slot, disk["used"], disk["reserved"]) == (32, 64 * GiB, 3, 15)
            assert client.execute("system_reset") == {}
            client.wait_event("RESET")
        _plugged(client, 2 * GiB)
        vm.send_signal(signal.SIGTERM)
        shutdowns = []
        with pytest.raises(AssertionError, match="connection closed"):
            while True:
                shutdowns.append(client.wait_event("SHUTDOWN"))
        client.close()
        _, err = vm.communicate(timeout=60)
    finally:
        if vm.poll() is None:
            vm.kill()
        backend.kill()
    assert [e["data"] for e in shutdowns] == [{"guest": False, "reason": "host-signal"}]
    assert vm.returncode == 0, err
    assert err.strip().splitlines() == [f"kvmmem run: terminating on signal 15 from pid {os.getpid()}"]
    assert not qmp.exists() and not Path(f"{qmp}.lock").exists()
