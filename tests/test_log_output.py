"""The VMM's log lines never block the thread that logs: a bounded queue and a
writer thread that drops and counts what stderr does not take."""

from __future__ import annotations

import fcntl
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from qmp_client import QmpClient
from tiny_guest import elf

from kvmmem.vmm.log_output import StderrLog

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60


def small_pipe() -> tuple[int, int]:
    """A pipe of one page, which a few dozen log lines fill."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    return r, w


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def blocked_in_pipe_write(pid: int, tid: int | None = None) -> bool:
    """Whether a thread of ``pid`` (or thread ``tid``) sleeps writing to a full pipe."""
    for task in [str(tid)] if tid is not None else os.listdir(f"/proc/{pid}/task"):
        try:
            if "pipe_write" in Path(f"/proc/{pid}/task/{task}/wchan").read_text():
                return True
        except FileNotFoundError:
            pass
    return False


def test_a_full_stderr_costs_dropped_lines_not_a_blocked_logger() -> None:
    r, w = small_pipe()
    logger = logging.getLogger("kvmmem.test-log-output")
    logger.propagate = False
    out = StderrLog(logger, fd=w, capacity=16)
    try:
        sent = 0

        def fill() -> bool:                      # log until the writer waits on the full pipe
            nonlocal sent
            logger.warning("line %d %s", sent, "x" * 64)
            sent += 1
            time.sleep(0.001)
            return blocked_in_pipe_write(os.getpid(), out._thread.native_id)

        wait_for(fill, "the writer to block on the full pipe")
        for _ in range(100):                      # more than the queue holds: dropped, not waited on
            logger.warning("line %d %s", sent, "x" * 64)
            sent += 1
        assert out.dropped >= 100 - 16
        received = bytearray()

        def drain() -> None:
            while chunk := os.read(r, 65536):
                received.extend(chunk)

        reader = threading.Thread(target=drain)
        reader.start()                            # stderr takes lines again
        out.close(timeout=TIMEOUT)
        assert not out._thread.is_alive()         # all written, then the count
        os.close(w)
        w = -1
        reader.join(TIMEOUT)
        lines = received.decode().splitlines()
        reports = [line for line in lines if line.startswith("kvmmem: ")]
        written = [line for line in lines if line.startswith("line ")]
        assert written[0] == "line 0 " + "x" * 64 and len(written) + len(reports) == len(lines)
        # the drops are told once stderr takes lines again: every line written or counted
        counts = [re.fullmatch(r"kvmmem: (\d+) log lines dropped \(stderr did not keep up; "
                               r"(\d+) in all\)", line) for line in reports]
        assert all(counts) and reports
        assert sum(int(m[1]) for m in counts if m) == out.dropped == int(counts[-1][2])  # type: ignore[index]
        assert len(written) + out.dropped == sent
    finally:
        logger.propagate = True
        os.close(r)
        if w >= 0:
            os.close(w)


def violations() -> bytes:
    """A guest that writes an invalid QueueNum (3) to the first virtio-mmio
    window for ever: each write is a protocol violation the transport logs
    while the vCPU thread holds Machine.lock."""
    return (b"\xb8\x38\x00\x00\xd0"               # mov eax, 0xd0000038 (QueueNum)
            b"\xc7\x00\x03\x00\x00\x00"           # loop: mov dword [rax], 3
            b"\xeb\xf8")                          # jmp loop


@pytest.mark.kvm
def test_kvmmem_run_with_stderr_into_an_unread_pipe_still_answers_and_quits(tmp_path: Path) -> None:
    kernel = tmp_path / "violations.elf"
    kernel.write_bytes(elf(violations()))
    sock = tmp_path / "qmp.sock"
    r, w = small_pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmmem", "run", "-m", "64M,maxmem=1088M",
         "-object", "memory-backend-ram,id=mem0,size=1G", "-device", "virtio-mem,id=vmem0,memdev=mem0",
         "-kernel", str(kernel), "-serial", "none", "-qmp", f"unix:{sock},server=on,wait=off"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=w)
    os.close(w)
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, "the QMP socket")
        client = QmpClient(sock)
        wait_for(lambda: blocked_in_pipe_write(proc.pid), "the log lines to fill stderr")
        # Each query takes Machine.lock. Three seconds of them: the guest's lines
        # (about a thousand a second here) outgrow the queue, so some are dropped.
        end = time.monotonic() + 3
        while time.monotonic() < end:
            assert client.execute("query-memory-devices")[0]["data"]["id"] == "vmem0"
        assert client.execute("query-status") == {"status": "running", "running": True}
        err = bytearray()

        def drain() -> None:                      # read at last: the rest, until the VMM exits
            while chunk := os.read(r, 65536):
                err.extend(chunk)

        client.execute("quit")
        reader = threading.Thread(target=drain)
        reader.start()
        assert client.until("SHUTDOWN")[-1] == "SHUTDOWN"
        client.close()
        assert proc.wait(TIMEOUT) == 0
        reader.join(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(r)
    lines = err.decode().splitlines()
    assert "virtio-mmio-vmem0: DEVICE_NEEDS_RESET: queue 0: QueueNum 3 is not a power of two" \
        in lines[0]
    assert any("log lines dropped (stderr did not keep up" in line for line in lines), (len(lines), lines[-3:])
