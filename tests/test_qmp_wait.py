"""``-qmp unix:PATH,server=on[,wait=on]``: as in QEMU, a server socket waits
for its first client before the VM starts (``wait=on``, the default);
``wait=off`` starts the VM at once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmmem.vmm.cli import OptionError, qmp_option

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60


def test_wait_is_on_unless_said_off() -> None:
    assert qmp_option("unix:/tmp/q.sock,server=on") == ("/tmp/q.sock", True)
    assert qmp_option("unix:/tmp/q.sock,server=on,wait=on") == ("/tmp/q.sock", True)
    assert qmp_option("unix:/tmp/q.sock,server=on,wait=off") == ("/tmp/q.sock", False)
    with pytest.raises(OptionError, match="wait='maybe' is not on or off"):
        qmp_option("unix:/tmp/q.sock,server=on,wait=maybe")


def start(guest: Path, tmp: Path, qmp: str) -> subprocess.Popen[str]:
    """The test guest, which exits at once once it runs (status 1: its exit 0)."""
    return subprocess.Popen(
        [sys.executable, "-m", "kvmmem", "run", "-m", "64M", "-kernel", str(guest),
         "-append", "kvmmem.steps=0", "-serial", f"file:{tmp / 'serial.txt'}", "-qmp", qmp],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def waiting_line(sock: Path) -> str:
    return f"kvmmem run: -qmp: waiting for connection on: unix:{sock},server=on"


@pytest.mark.kvm
def test_wait_on_starts_the_vcpu_when_the_first_client_connects(guest_elf: Path,
                                                                  tmp_path: Path) -> None:
    sock, serial = tmp_path / "qmp.sock", tmp_path / "serial.txt"
    vm = start(guest_elf, tmp_path, f"unix:{sock},server=on")
    try:
        assert vm.stderr is not None
        assert vm.stderr.readline().rstrip("\n") == waiting_line(sock)   # said before it waits
        assert sock.exists()
        time.sleep(1)                # a guest that ran would have printed and exited by now
        assert vm.poll() is None and serial.read_text() == ""
        client = socket.socket(socket.AF_UNIX)
        client.settimeout(TIMEOUT)
        client.connect(str(sock))
        assert b'"QMP"' in client.makefile("rb").readline()       # the greeting
        _, err = vm.communicate(timeout=TIMEOUT)                   # the guest ran, and ended
        client.close()
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.communicate()
    assert vm.returncode == 1 and err == "", err
    assert 'kvmmem-guest: cmdline "console=ttyS0 kvmmem.steps=0"' in serial.read_text()
    assert not sock.exists() and not Path(f"{sock}.lock").exists()


@pytest.mark.kvm
def test_a_signal_while_waiting_for_a_client_exits_cleanly(guest_elf: Path, tmp_path: Path) -> None:
    sock, serial = tmp_path / "qmp.sock", tmp_path / "serial.txt"
    vm = start(guest_elf, tmp_path, f"unix:{sock},server=on,wait=on")
    try:
        assert vm.stderr is not None
        first = vm.stderr.readline().rstrip("\n")
        vm.send_signal(signal.SIGTERM)
        _, err = vm.communicate(timeout=TIMEOUT)
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.communicate()
    assert first == waiting_line(sock)
    assert vm.returncode == 0, err
    assert err.splitlines() == [f"kvmmem run: terminating on signal 15 from pid {os.getpid()}"]
    assert serial.read_text() == ""                            # the guest never ran
    assert not sock.exists() and not Path(f"{sock}.lock").exists()


@pytest.mark.kvm
def test_wait_off_runs_the_guest_without_a_client(guest_elf: Path, tmp_path: Path) -> None:
    sock, serial = tmp_path / "qmp.sock", tmp_path / "serial.txt"
    vm = start(guest_elf, tmp_path, f"unix:{sock},server=on,wait=off")
    try:
        _, err = vm.communicate(timeout=TIMEOUT)
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.communicate()
    assert vm.returncode == 1 and err == "", err
    assert 'kvmmem-guest: cmdline "console=ttyS0 kvmmem.steps=0"' in serial.read_text()
    assert not sock.exists()
