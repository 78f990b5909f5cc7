"""Guest output never blocks the VMM's control plane.

A guest floods its UART into a real pipe that nobody reads. The vCPU must
not block in ``write`` while it holds the machine lock: a QMP client still
gets answers to commands that take the lock, and ``quit`` quits. Output the
sink cannot take is dropped and counted, and the buffer stays bounded.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from qmp_client import QmpClient
from tiny_guest import elf, flood

from kvmmem.vmm.chardev import BufferedOutput, fd_writer

MiB = 1 << 20
TIMEOUT = 30
ROOT = Path(__file__).resolve().parents[1]


def _small_pipe() -> tuple[int, int]:
    """A pipe of one page, so that a flooding guest fills it at once."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    return r, w


def _sleeping_in(what: str, pid: int, tid: int | None = None) -> bool:
    """Whether a thread of ``pid`` (or thread ``tid``) sleeps in a kernel
    function whose name has ``what`` (its wchan)."""
    tasks = [str(tid)] if tid is not None else os.listdir(f"/proc/{pid}/task")
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/wchan") as f:
                if what in f.read():
                    return True
        except FileNotFoundError:
            pass
    return False


def _blocked_in_pipe_write(pid: int, tid: int | None = None) -> bool:
    """The pipe is full and nobody reads it."""
    return _sleeping_in("pipe_write", pid, tid)


def _wait_for(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


# -- the buffer alone (no KVM) ---------------------------------------------------

def test_a_blocked_sink_costs_dropped_bytes_not_a_blocked_caller() -> None:
    release = threading.Event()
    taken: list[bytes] = []

    def sink(data: bytes) -> None:
        release.wait()
        taken.append(data)

    out = BufferedOutput(sink, capacity=1000)
    out(b"a")                                         # the writer takes it and blocks
    _wait_for(lambda: out.pending == 0, "the writer to take the first byte")
    for _ in range(100):
        out(b"b" * 100)                               # 10000 bytes, none of them waited on
    assert out.pending == 1000 and out.dropped == 9000
    release.set()
    assert out.flush(TIMEOUT)
    assert b"".join(taken) == b"a" + b"b" * 1000 and out.written == 1001
    out(b"after")
    out.close()
    assert b"".join(taken).endswith(b"after") and out.dropped == 9000
    out(b"closed")
    assert out.dropped == 9006


def test_a_failing_sink_is_reported_once_and_its_output_dropped(caplog) -> None:  # type: ignore[no-untyped-def]
    r, w = os.pipe()
    os.close(r)                                       # EPIPE (SIGPIPE is ignored by Python)
    out = BufferedOutput(fd_writer(w), capacity=100)
    try:
        out(b"x" * 10)
        _wait_for(lambda: out.dropped == 10, "the failed write to be counted")
        for _ in range(5):
            out(b"y" * 10)
        out.close()
        assert out.dropped == 60 and out.written == 0
        failures = [r for r in caplog.records if "the output failed" in r.getMessage()]
        assert len(failures) == 1 and "BrokenPipeError" in failures[0].getMessage()
    finally:
        os.close(w)


# -- a machine whose UART output nobody reads -------------------------------------------

@pytest.mark.kvm
def test_flooding_guest_into_an_unread_pipe_leaves_qmp_answering(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    from kvmmem.vmm.machine import Machine, MachineConfig
    from kvmmem.vmm.qmp import QmpServer

    kernel = tmp_path / "flood.elf"
    kernel.write_bytes(elf(flood()))
    r, w = _small_pipe()
    out = BufferedOutput(fd_writer(w), capacity=4096)
    machine = Machine(MachineConfig(ram_size=64 * MiB, kernel=str(kernel), serial=out))
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(machine.run()))
    try:
        with QmpServer(machine, tmp_path / "qmp.sock"):
            client = QmpClient(tmp_path / "qmp.sock")
            thread.start()
            _wait_for(lambda: out.dropped > 0, "guest output to be dropped")
            _wait_for(lambda: _blocked_in_pipe_write(os.getpid(), out._thread.native_id),
                      "the writer to block on the full pipe")
            for _ in range(20):                       # each takes the machine lock
                assert client.execute("query-memory-devices") == []
                assert client.execute("x-query-memslots")
            assert out.pending <= out.capacity and thread.is_alive()
            client.execute("quit")
            thread.join(TIMEOUT)
            assert status == [0]
            client.close()
        out.close()
        assert out.pending == 0 and out.dropped > 0
        assert any("bytes of guest output dropped" in r.getMessage() for r in caplog.records)
    finally:
        if thread.is_alive():
            machine.shutdown(1)
            thread.join(TIMEOUT)
        machine.close()
        os.close(r)                                   # EPIPE ends the blocked writer
        os.close(w)


@pytest.mark.kvm
def test_kvmmem_run_with_serial_stdio_into_an_unread_pipe_still_quits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    kernel = tmp_path / "flood.elf"
    kernel.write_bytes(elf(flood()))
    sock = tmp_path / "qmp.sock"
    r, w = _small_pipe()
    proc = subprocess.Popen([sys.executable, "-m", "kvmmem", "run", "-m", "64M", "-kernel",
                             str(kernel), "-serial", "stdio", "-qmp",
                             f"unix:{sock},server=on,wait=off"],
                            cwd=ROOT, stdout=w, stderr=subprocess.PIPE)
    os.close(w)
    try:
        _wait_for(lambda: sock.exists() or proc.poll() is not None, "the QMP socket")
        client = QmpClient(sock)
        _wait_for(lambda: _blocked_in_pipe_write(proc.pid), "the guest to fill the pipe")
        for _ in range(20):
            assert client.execute("query-memory-devices") == []
        assert client.execute("query-status") == {"status": "running", "running": True}
        client.execute("quit")
        assert client.until("SHUTDOWN") == ["SHUTDOWN"]
        client.close()
        assert proc.wait(TIMEOUT) == 0
        assert proc.stderr is not None
        assert b"bytes of guest output dropped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        os.close(r)


def test_a_non_blocking_descriptor_is_waited_for_not_given_up() -> None:
    r, w = _small_pipe()
    os.set_blocking(w, False)
    out = BufferedOutput(fd_writer(w), capacity=64 << 10)
    try:
        out(bytes(range(256)) * 64)                   # 16 KiB through a 4 KiB pipe
        _wait_for(lambda: out.dropped or _sleeping_in("poll", os.getpid(), out._thread.native_id),
                  "the writer to wait for the full pipe (or to give up)")
        assert out.dropped == 0
        received = bytearray()
        while len(received) < 16384:
            received += os.read(r, 4096)
        assert out.flush(TIMEOUT)
        assert received == bytes(range(256)) * 64 and out.dropped == 0
    finally:
        out.close()
        os.close(r)
        os.close(w)
