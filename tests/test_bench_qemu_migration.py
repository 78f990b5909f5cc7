"""The pure parts of scripts/bench_qemu_migration.py (QEMU 10 itself is not
a dependency: the script runs only where it is unpacked)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmmem.measure.bench_qemu_migration import guest_cmdline, main, qemu_command


def test_the_guest_command_line_drops_kvmmem_devices_and_adds_a_console() -> None:
    line = "noxsave virtio_mmio.device=512@0xd0000000:5 kvmmem_monitor=1000"
    assert guest_cmdline(line) == "noxsave kvmmem_monitor=1000 console=ttyS0"
    assert guest_cmdline("console=ttyS1 x") == "console=ttyS1 x"


def test_qemu_gets_the_device_and_the_mode_asked_for(tmp_path: Path) -> None:
    qemu = tmp_path / "usr" / "bin" / "qemu-system-x86_64"
    cmd = qemu_command(qemu, True, 1 << 40, 1 << 30, "serial", "qmp.sock", incoming=True,
                       cmdline="noxsave")
    assert "virtio-mem-pci,id=vmem0,memdev=mem0,requested-size=1024M,dynamic-memslots=on" in cmd
    assert cmd[cmd.index("-m") + 1] == "256M,maxmem=1048832M,slots=1"
    assert cmd[-2:] == ["-incoming", "defer"]
    off = qemu_command(qemu, False, 1 << 40, 1 << 30, "serial", "qmp.sock", cmdline="noxsave")
    assert any("dynamic-memslots=off" in a for a in off) and "-incoming" not in off


def test_without_qemu_10_it_says_so_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--qemu", str(tmp_path / "nothing")]) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "QEMU 10 not found" in out
