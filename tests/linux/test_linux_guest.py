"""Linux's own virtio_mem driver as the client of kvmmem's virtio-mem device.

Each test boots the test kernel of ``make linux-guest`` under ``kvmmem run``
(a subprocess with a QMP socket) and resizes the device over QMP. After each
step the guest's report (its MemTotal and online memory blocks, the driver's
plugged and requested sizes), ``query-memory-devices``, ``x-query-memslots``
and the QMP events must all agree. Nothing here is timed: every wait is on a
report line or an event, with a generous deadline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from linux_guest import (
    CMDLINE,
    KERNEL,
    MEMORY_BLOCK,
    Device,
    GiB,
    GuestFailed,
    LinuxGuest,
    MiB,
    Report,
)

from kvmmem.devices.exact_cover import ExactCover, reference_cover
from kvmmem.devices.plug_bitmap import PlugBitmap

pytestmark = pytest.mark.linux

BOOT_TIMEOUT = 600          # seconds; a boot takes about a minute on an idle machine
STEP_TIMEOUT = 900          # unplugging 1 GiB takes the guest minutes on a busy machine
SEQUENCE = (1 * GiB, 0, 512 * MiB)
DEVICE_SIZE = 4 * GiB


@pytest.fixture(scope="session")
def kernel() -> Path:
    if not KERNEL.exists() or not CMDLINE.exists():
        pytest.skip("no Linux test kernel: run `make linux-guest` (or `make test-linux`)")
    return KERNEL


@dataclass
class Session:
    """A booted guest, its first report, and each device's guest-side name."""

    guest: LinuxGuest
    boot: Report
    names: dict[str, str]        # QMP id -> the driver's device name (virtio0...)

    @classmethod
    def boot_guest(cls, guest: LinuxGuest, since: float = 0.0) -> Session:
        """Wait for the monitor's first line that shows every device probed
        with nothing plugged yet, and match devices by their start address."""
        count = len(guest.devices)
        boot = guest.wait_report("the monitor's first report with every device probed",
                                 lambda r: len(r.devices) == count, since, BOOT_TIMEOUT)
        probes = guest.probe_lines(since)
        infos = {d["data"]["id"]: d["data"] for d in guest.cmd("query-memory-devices")}
        names = {}
        for dev_id, info in infos.items():
            found = [n for n, p in probes.items() if p.get("start address") == info["memaddr"]]
            assert len(found) == 1, f"{dev_id} at {info['memaddr']:#x}: probes {probes}"
            names[dev_id] = found[0]
        return cls(guest, boot, names)

    def plugged_total(self, report: Report) -> int:
        return sum(p for p, _ in report.devices.values())

    def settled(self, report: Report, sizes: dict[str, int]) -> bool:
        """The driver has each device at its size, exactly the memory blocks
        it plugged are online, and MemTotal differs from boot by exactly the
        plugged size (when unplugging, MemTotal drops seconds after the
        block's removal, so this is waited for, not asserted at once)."""
        plugged = self.plugged_total(report)
        return (report.online_blocks == self.boot.online_blocks + plugged // MEMORY_BLOCK
                and report.memtotal_kb == self.boot.memtotal_kb + plugged // 1024
                and all(report.devices.get(self.names[d]) == (s, s) for d, s in sizes.items()))

    def steady(self, report: Report) -> None:
        """The next report (the periodic one) shows the same state."""
        after = self.guest.wait_report("the next report", lambda r: r.at > report.at,
                                       report.at, STEP_TIMEOUT)
        assert (after.memtotal_kb, after.online_blocks, after.devices) == \
            (report.memtotal_kb, report.online_blocks, report.devices)

    def resize(self, dev_id: str, size: int, others: dict[str, int] | None = None) -> Report:
        """Set ``dev_id``'s requested-size and check everything that must follow."""
        guest = self.guest
        sizes = {**(others or {}), dev_id: size}
        start, first_event = guest.now(), len(guest.events)
        before = next(d["data"]["size"] for d in guest.cmd("query-memory-devices")
                      if d["data"]["id"] == dev_id)
        guest.set_requested(dev_id, size)
        report = guest.wait_report(f"{dev_id} at {size:#x} and MemTotal {size:#x} over boot",
                                   lambda r: self.settled(r, sizes), start, STEP_TIMEOUT)
        self.steady(report)
        if size != before:
            changes = guest.wait_for(
                f"MEMORY_DEVICE_SIZE_CHANGE of {dev_id} to {size:#x}",
                lambda: [e["data"]["size"] for e in guest.events[first_event:]
                         if e["event"] == "MEMORY_DEVICE_SIZE_CHANGE"
                         and e["data"]["id"] == dev_id and e["data"]["size"] == size],
                STEP_TIMEOUT)
            assert changes
        infos = {d["data"]["id"]: d["data"] for d in guest.cmd("query-memory-devices")}
        for d, s in sizes.items():
            assert (infos[d]["size"], infos[d]["requested-size"]) == (s, s), infos[d]
            expected = self.expected_memslots(d, infos[d])
            # memslots=exact merges merge-delay ms after the driver's last plug
            guest.wait_for(f"{d}'s memslots to be {sorted(expected)}",
                           lambda d=d, expected=expected: self.memslots(d) == expected,
                           STEP_TIMEOUT)
        assert not [e for e in guest.events if e["event"] == "X_KVMMEM_UNPLUGGED_ACCESS"]
        return report

    def memslots(self, dev_id: str) -> set[tuple[int, int]]:
        return {(s["start"], s["size"]) for s in self.guest.cmd("x-query-memslots")
                if s.get("device") == dev_id}

    def expected_memslots(self, dev_id: str, info: dict[str, Any]) -> set[tuple[int, int]]:
        """``single``: the whole region. ``usable``: the memslots that
        intersect the usable region. ``dynamic``: those that hold a plugged
        block; Linux's driver plugs memory blocks from the start of the
        region and unplugs from the end, so they cover [start, start + size).
        ``exact``: the exact cover (``exact_cover.reference_cover``, nothing
        coarse) of that plugged prefix, in the chunk sizes the device's own
        :class:`ExactCover` allows."""
        mode = self.guest.prop(dev_id, "memslots")
        addr, region = info["memaddr"], info["max-size"]
        if mode == "single":
            return {(addr, region)}
        slot = self.guest.prop(dev_id, "memslot-size")
        if mode == "exact":
            block = info["block-size"]
            bits = PlugBitmap(region // block)
            if info["size"]:
                bits.set(0, info["size"] // block, True)
            cells = -(-region // slot)
            levels = ExactCover(bits.nb_blocks, block, slot // block, cells).levels
            return {(addr + first * block, n * block)
                    for first, n in reference_cover(bits, bits.nb_blocks, levels, slot // block)}
        covered = info["size"] if mode == "dynamic" else self.guest.prop(dev_id, "usable-region-size")
        return {(addr + i * slot, min(slot, region - i * slot)) for i in range(-(-covered // slot))}


def _sequence(session: Session, dev_id: str) -> None:
    for size in SEQUENCE:
        session.resize(dev_id, size)


def test_driver_discovers_device_then_follows_dynamic_block_memslots(kernel: Path) -> None:
    device = Device("vmem0", DEVICE_SIZE, memslots="dynamic", protect="block")
    with LinuxGuest([device]) as guest:
        session = Session.boot_guest(guest)
        [info] = [d["data"] for d in guest.cmd("query-memory-devices")]
        probe = guest.probe_lines()[session.names["vmem0"]]
        assert probe["start address"] == info["memaddr"]
        assert probe["region size"] == info["max-size"] == DEVICE_SIZE
        assert probe["device block size"] == info["block-size"]
        assert probe["plugged size"] == probe["requested size"] == 0
        assert session.boot.devices == {session.names["vmem0"]: (0, 0)}
        assert session.memslots("vmem0") == set()          # nothing plugged: no memslot
        _sequence(session, "vmem0")


@pytest.mark.parametrize(("mode", "protect"),
                         [("usable", "slot"), ("single", "slot"), ("exact", "block")])
def test_driver_resizes_device_with_memslots(kernel: Path, mode: str, protect: str) -> None:
    with LinuxGuest([Device("vmem0", DEVICE_SIZE, memslots=mode, protect=protect)]) as guest:
        session = Session.boot_guest(guest)
        _sequence(session, "vmem0")


def test_system_reset_reprobes_and_replugs(kernel: Path) -> None:
    size = 512 * MiB
    with LinuxGuest([Device("vmem0", DEVICE_SIZE)]) as guest:
        session = Session.boot_guest(guest)
        session.resize("vmem0", size)
        reset_at, first_event = guest.now(), len(guest.events)
        guest.cmd("system_reset")
        guest.wait_for("the RESET event", lambda: [
            e for e in guest.events[first_event:] if e["event"] == "RESET"], BOOT_TIMEOUT)
        again = Session.boot_guest(guest, since=reset_at)
        probe = guest.probe_lines(reset_at)[again.names["vmem0"]]
        assert (probe["plugged size"], probe["requested size"]) == (0, size)
        again.boot = session.boot                            # MemTotal is compared to the first boot
        report = guest.wait_report("the driver plugging back to the request",
                                   lambda r: again.settled(r, {"vmem0": size}), reset_at,
                                   STEP_TIMEOUT)
        again.steady(report)
        sizes = [e["data"]["size"] for e in guest.events[first_event:]
                 if e["event"] == "MEMORY_DEVICE_SIZE_CHANGE"]
        assert sizes[0] == 0 and sizes[-1] == size          # unplugged by the reset, then back
        [info] = [d["data"] for d in guest.cmd("query-memory-devices")]
        assert (info["size"], info["requested-size"]) == (size, size)
        assert again.memslots("vmem0") == again.expected_memslots("vmem0", info)


def test_a_snapshot_restores_into_a_new_vmm_and_the_guest_goes_on(kernel: Path,
                                                                   tmp_path: Path) -> None:
    """QMP stop + migrate to a file, then ``kvmmem run -incoming file:``: the
    restored kernel's monitor lines go on (no boot, no new probe), and its
    driver plugs and unplugs as before (issue 21)."""
    path = tmp_path / "snapshot"
    device = Device("vmem0", DEVICE_SIZE)
    with LinuxGuest([device]) as guest:
        session = Session.boot_guest(guest)
        session.resize("vmem0", 512 * MiB)
        guest.cmd("stop")
        guest.cmd("migrate", uri=f"file:{path}")
        deadline = time.monotonic() + STEP_TIMEOUT      # (wait_for wants a running VM)
        while guest.cmd("query-migrate").get("status") != "completed":
            assert time.monotonic() < deadline, guest.cmd("query-migrate")
            time.sleep(0.05)
        boot, names = session.boot, session.names
    with LinuxGuest([device], extra_options=["-incoming", f"file:{path}"]) as restored:
        again = Session(restored, boot, names)
        report = restored.wait_report("a report from the restored guest",
                                      lambda r: again.settled(r, {"vmem0": 512 * MiB}), 0,
                                      STEP_TIMEOUT)
        again.steady(report)
        assert restored.probe_lines() == {}        # the driver did not probe again: no boot
        again.resize("vmem0", 1 * GiB)
        again.resize("vmem0", 256 * MiB)


def test_two_devices_resize_independently(kernel: Path) -> None:
    devices = [Device("vmem0", 2 * GiB), Device("vmem1", 2 * GiB, memslots="usable", protect="slot")]
    with LinuxGuest(devices) as guest:
        session = Session.boot_guest(guest)
        assert len(set(session.names.values())) == 2
        session.resize("vmem0", 256 * MiB, {"vmem1": 0})
        session.resize("vmem1", 384 * MiB, {"vmem0": 256 * MiB})
        session.resize("vmem0", 0, {"vmem1": 384 * MiB})


def test_guest_stopped_by_kvm_ends_the_wait_with_its_last_lines(kernel: Path) -> None:
    """Without ``noxsave`` the kernel's FPU setup runs ``xrstor``, which this
    host's KVM cannot emulate: the wait ends at once (the VMM exits, or QMP
    reports the internal error) with the guest's lines and the VMM's error."""
    with (LinuxGuest([Device("vmem0", DEVICE_SIZE)], drop_options=["noxsave"]) as guest,
          pytest.raises(GuestFailed) as failure):
        guest.wait_report("a report that never comes", lambda r: True, 0, BOOT_TIMEOUT)
    message = str(failure.value)
    assert guest.lines and guest.lines[-1][1] in message     # the guest's last serial line
    assert "internal" in message.lower()              # the VMM's (or QMP's) internal error
    assert "timed out" not in message
