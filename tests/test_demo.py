"""`kvmmem demo` and the host-side driver it uses, on real KVM."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from seed import seed_listings
from vmem_helpers import GiB, MiB, plug_device, small_machine

from kvmmem.measure.demo import run_demo
from kvmmem.measure.host_driver import HostDriver
from kvmmem.units import format_size, parse_size


def test_sizes_parse_and_format_like_qemu() -> None:
    assert parse_size("2G") == 2 * GiB and parse_size("512M") == 512 * MiB
    assert parse_size("1T") == 1 << 40 and parse_size("4096") == 4096 and parse_size("0x1000") == 4096
    for bad in ("", "12X", "-1G", "1.5K5"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert [format_size(s) for s in (2 * GiB, 1536 * MiB, 4097)] == ["2G", "1536M", "4097"]


@pytest.mark.kvm
def test_demo_replays_the_seed_in_usable_mode_and_dynamic_counterpart() -> None:
    lines: list[str] = []
    run_demo(driver="host", say=lines.append)
    text = "\n".join(lines)
    usable, dynamic = text.split("== memslots=dynamic")
    for listing in seed_listings():
        assert "\n".join(listing) in usable
    counts = [int(n) for n in re.findall(r"memslots: (\d+) of the device", usable)]
    assert counts == [0, 3, 21, 6]
    counts = [int(n) for n in re.findall(r"memslots: (\d+) of the device", dynamic)]
    assert counts == [0, 2, 20, 5]
    plugged = re.findall(r"plugged (\S+) \|", text)
    assert plugged == ["0", "2G", "20G", "5G"] * 2


@pytest.mark.kvm
def test_demo_with_the_test_guest_as_driver() -> None:
    lines: list[str] = []
    run_demo(modes=("usable", "dynamic", "exact"), size=16 * GiB,
             requested=(2 * GiB, 3 * GiB, GiB), ram=512 * MiB, maxmem=24 * GiB, say=lines.append)
    text = "\n".join(lines)
    assert text.count("driven by the test guest under KVM") == 3
    usable, dynamic = text.split("== memslots=dynamic")
    dynamic, exact = dynamic.split("== memslots=exact")
    assert [int(n) for n in re.findall(r"memslots: (\d+) of the device", usable)] == [0, 3, 4, 2]
    assert [int(n) for n in re.findall(r"memslots: (\d+) of the device", dynamic)] == [0, 2, 3, 1]
    # contiguous whole GiBs: exact's chunks are dynamic's memslots, once merged
    assert [int(n) for n in re.findall(r"memslots: (\d+) of the device", exact)] == [0, 2, 3, 1]
    assert re.findall(r"plugged (\S+) \|", text) == ["0", "2G", "3G", "1G"] * 3


@pytest.mark.kvm
def test_host_driver_follows_requested_size_in_128_mib_steps(vm) -> None:  # type: ignore[no-untyped-def]
    machine = small_machine(vm)
    dev = plug_device(machine, block=2 * MiB)
    driver = HostDriver(dev)
    for size in (300 * MiB, 3 * GiB, 130 * MiB, 0, GiB):
        dev.set_requested_size(size)
        assert driver.sync() == size == dev.plugged_size
    assert driver.requests >= 3 * GiB // (128 * MiB)
    machine.system_reset()
    driver.reboot()
    assert driver.sync() == GiB
    machine.close()


def test_demo_command_line_refuses_bad_options_in_one_line() -> None:
    out = subprocess.run([sys.executable, "-m", "kvmmem", "demo", "--size", "12X"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "'12X' is not a size" in out.stderr
