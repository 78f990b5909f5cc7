"""`kvmmem run` with a vhost-user-blk disk: QEMU's spelling, refusals, a real boot."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import config, run
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
])
def test_bad_vhost_options_are_refused(argv, option: str, why: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OptionError) as info:
        config("-m", "1G", *argv)
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
