"""`kvmmem run` with a vhost-user-blk disk: QEMU's spelling, refusals, a real boot."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import ROOT, config, run
from vhost_helpers import MiB, start_backend

from kvmmem.vmm.cli import OptionError

GiB = 1 << 30


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
def test_private_boot_ram_is_refused_in_one_line(tmp_path: Path, guest_elf: Path) -> None:
    backend = start_backend(tmp_path)
    try:
        out = run("-m", "512M", "-chardev", f"socket,id=c0,path={backend.socket}",
                  "-device", "vhost-user-blk,chardev=c0,id=disk0", "-kernel", str(guest_elf))
    finally:
        backend.kill()
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "guest RAM 'pc.ram' is not shared memory" in lines[0], out.stderr


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
