"""Live migration, snapshots and cancel between real ``kvmmem run`` processes
over QMP, as QEMU's users do them (issue 21).

The test guest hammers its plugged memory (``kvmmem.hammer=1``: every round
writes and reads back each plugged block, a line every 64 rounds) on real
KVM while the source migrates it, dirty pages and all, to a destination
started with ``-incoming``: there its rounds must go on (no new boot), every
value read back as written.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from waiting import wait_until

from kvmmem.measure.soak import Qmp

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parents[1]
ROUND = re.compile(r"hammer round=(\d+)")


class Vm:
    """A ``kvmmem run`` of the hammering guest, its serial output in a file."""

    def __init__(self, tmp: Path, name: str, guest: Path, mode: str, *extra: str) -> None:
        self.serial = tmp / f"{name}.serial"
        self.qmp_path = str(tmp / f"{name}.qmp")
        argv = [sys.executable, "-m", "kvmmem", "run", "-m", "256M,maxmem=17G",
                "-object", "memory-backend-ram,id=mem0,size=16G",
                "-device", f"virtio-mem,id=vmem0,memdev=mem0,requested-size=256M,memslots={mode}",
                "-kernel", str(guest), "-append", "kvmmem.hammer=1",
                "-serial", f"file:{self.serial}", "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                *extra]
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        wait_until(lambda: os.path.exists(self.qmp_path) or self.proc.poll() is not None,
                   f"{name} did not start")
        self.qmp = Qmp(self.qmp_path)

    def rounds(self) -> list[int]:
        text = self.serial.read_text() if self.serial.exists() else ""
        return [int(m) for m in ROUND.findall(text)]

    def lines(self) -> str:
        return self.serial.read_text() if self.serial.exists() else ""

    def quit(self) -> str:
        try:
            self.qmp.execute("quit")
        except (RuntimeError, OSError):
            pass
        try:
            _, err = self.proc.communicate(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return err


@pytest.fixture
def vms(tmp_path: Path, guest_elf: Path) -> Iterator[Callable[..., Vm]]:
    made: list[Vm] = []

    def make(name: str, mode: str, *extra: str) -> Vm:
        made.append(Vm(tmp_path, name, guest_elf, mode, *extra))
        return made[-1]

    yield make
    for vm in made:
        if vm.proc.poll() is None:
            vm.quit()


def migration_done(qmp: Qmp) -> dict[str, Any]:
    info: dict[str, Any] = qmp.execute("query-migrate")
    return info if info.get("status") in ("completed", "failed", "cancelled") else {}


@pytest.mark.parametrize("mode", ["single", "usable", "dynamic", "exact"])
def test_live_migration_of_a_hammering_guest(vms, tmp_path: Path, mode: str) -> None:  # type: ignore[no-untyped-def]
    sock = str(tmp_path / "migrate.sock")
    dest = vms("dest", mode, "-incoming", f"unix:{sock}")
    source = vms("source", mode)
    wait_until(lambda: source.rounds(), "the source guest did not hammer")
    wait_until(lambda: os.path.exists(sock), "the destination does not listen")
    source.qmp.execute("migrate", uri=f"unix:{sock}")
    info = wait_until(lambda: migration_done(source.qmp), "the migration did not end")
    assert info["status"] == "completed", info
    assert info["ram"]["remaining"] == 0 and info["ram"]["dirty-sync-count"] >= 1
    assert "downtime" in info and info["ram"]["transferred"] > 0
    # the source stays stopped; its MIGRATION events went setup -> active -> completed
    assert source.qmp.execute("query-status")["status"] == "paused"
    statuses = [e["data"]["status"] for e in source.qmp.events if e["event"] == "MIGRATION"]
    assert statuses == ["setup", "active", "completed"], statuses
    last = source.rounds()[-1]
    # the destination goes on with the guest's next rounds, not a new boot
    wait_until(lambda: len(dest.rounds()) >= 2, "the destination guest did not go on")
    assert dest.rounds()[0] > last - 64 and dest.rounds()[0] >= 64, (last, dest.rounds()[:3])
    assert dest.qmp.execute("query-status")["status"] == "running"
    sizes = dest.qmp.execute("query-memory-devices")[0]["data"]
    assert sizes["size"] == 256 << 20
    err = dest.quit()
    assert "Traceback" not in err, err
    assert not [line for line in (source.lines() + dest.lines()).splitlines()
                if "mismatch" in line or "error" in line]


def test_a_snapshot_over_qmp_restores_with_incoming_file(vms, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                          guest_elf: Path) -> None:
    path = tmp_path / "snapshot"
    source = vms("source", "exact")
    wait_until(lambda: source.rounds(), "the guest did not hammer")
    source.qmp.execute("stop")
    source.qmp.execute("migrate", uri=f"file:{path}")
    assert wait_until(lambda: migration_done(source.qmp), "no snapshot")["status"] == "completed"
    last = source.rounds()[-1]
    source.quit()
    restored = vms("restored", "exact", "-incoming", f"file:{path}")
    wait_until(lambda: len(restored.rounds()) >= 2, "the restored guest did not go on")
    assert restored.rounds()[0] in (last + 64, last + 128), (last, restored.rounds()[:3])
    # a stream that is not one is refused in one line, status 1
    bad = tmp_path / "bad"
    bad.write_bytes(path.read_bytes()[:1000])
    out = run_incoming(guest_elf, f"file:{bad}")
    assert out.returncode == 1 and out.stderr.startswith("kvmmem run: -incoming: "), out.stderr
    assert "Traceback" not in out.stderr
    # a file that is not a socket is never replaced by the one to listen on
    kept = tmp_path / "kept"
    kept.write_text("the user's")
    out = run_incoming(guest_elf, f"unix:{kept}")
    assert out.returncode == 1 and "exists and is not a socket" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and kept.read_text() == "the user's"


def run_incoming(guest_elf: Path, uri: str) -> subprocess.CompletedProcess[str]:
    """``kvmmem run -incoming URI`` expected to refuse at once."""
    return subprocess.run([sys.executable, "-m", "kvmmem", "run", "-m", "256M,maxmem=17G",
                           "-object", "memory-backend-ram,id=mem0,size=16G",
                           "-device", "virtio-mem,id=vmem0,memdev=mem0,memslots=exact",
                           "-kernel", str(guest_elf), "-incoming", uri],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_cancelled_migration_leaves_the_source_running(vms, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source = vms("source", "dynamic")
    wait_until(lambda: source.rounds(), "the guest did not hammer")
    source.qmp.execute("migrate-set-parameters", **{"max-bandwidth": 1 << 20})
    source.qmp.execute("migrate", uri=f"file:{tmp_path / 'slow'}")
    with pytest.raises(RuntimeError, match="There's a migration process in progress"):
        source.qmp.execute("migrate", uri=f"file:{tmp_path / 'other'}")
    wait_until(lambda: source.qmp.execute("query-migrate")["status"] == "active", "not active")
    with pytest.raises(RuntimeError, match="cannot change while the machine migrates"):
        source.qmp.execute("qom-set", path="/machine/peripheral/vmem0",
                           property="requested-size", value=384 << 20)
    source.qmp.execute("migrate_cancel")
    info = wait_until(lambda: migration_done(source.qmp), "the cancel did not end it")
    assert info["status"] == "cancelled"
    assert source.qmp.execute("query-status")["status"] == "running"
    before = len(source.rounds())
    wait_until(lambda: len(source.rounds()) > before, "the source guest stopped")
    # the device takes a new size again (refused while the migration ran)
    source.qmp.execute("qom-set", path="/machine/peripheral/vmem0", property="requested-size",
                       value=512 << 20)
    assert source.qmp.execute("qom-get", path="/machine/peripheral/vmem0",
                              property="requested-size") == 512 << 20


def test_incoming_defer_takes_the_uri_from_migrate_incoming(vms, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sock = str(tmp_path / "later.sock")
    dest = vms("dest", "dynamic", "-incoming", "defer")
    with pytest.raises(RuntimeError, match="invalid migration URI 'tcp:1'"):
        dest.qmp.execute("migrate-incoming", uri="tcp:1")
    assert not os.path.exists(sock)                     # nothing listens before the command
    dest.qmp.execute("migrate-incoming", uri=f"unix:{sock}")
    with pytest.raises(RuntimeError, match="already been started"):
        dest.qmp.execute("migrate-incoming", uri=f"unix:{sock}")
    source = vms("source", "dynamic")
    wait_until(lambda: source.rounds(), "the source guest did not hammer")
    wait_until(lambda: os.path.exists(sock), "the destination does not listen")
    source.qmp.execute("migrate", uri=f"unix:{sock}")
    assert wait_until(lambda: migration_done(source.qmp), "no migration")["status"] == "completed"
    last = source.rounds()[-1]
    wait_until(lambda: len(dest.rounds()) >= 2, "the destination guest did not go on")
    assert dest.rounds()[0] > last - 64 and dest.rounds()[0] >= 64, (last, dest.rounds()[:3])


def test_a_reset_during_the_migration_fails_it_and_the_source_runs_on(vms, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source = vms("source", "dynamic")
    wait_until(lambda: source.rounds(), "the guest did not hammer")
    source.qmp.execute("migrate-set-parameters", **{"max-bandwidth": 2 << 20})
    source.qmp.execute("migrate", uri=f"file:{tmp_path / 'stream'}")
    wait_until(lambda: source.qmp.execute("query-migrate")["status"] == "active", "not active")
    source.qmp.execute("system_reset")          # everything unplugged after the state went out
    info = wait_until(lambda: migration_done(source.qmp), "the migration did not end", 120)
    assert info["status"] == "failed", info
    assert "reset during the migration" in info["error-desc"]
    assert source.qmp.execute("query-status")["status"] == "running"
    before = len(source.rounds())               # the rebooted guest plugs and hammers again
    wait_until(lambda: len(source.rounds()) > before, "the source guest did not go on")
