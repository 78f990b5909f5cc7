"""The parsing of the Linux test kernel's lines (no kernel needed: plain unit tests)."""

from __future__ import annotations

from linux_guest import PROBE, Report


def test_report_line_parses_every_device() -> None:
    line = ("[   35.10] kvmmem-guest: memtotal_kb=512712 online_blocks=4 "
            "virtio_mem=virtio0:268435456/268435456,virtio1:0/134217728")
    report = Report.parse(line, 12.5)
    assert report == Report(512712, 4, {"virtio0": (268435456, 268435456),
                                        "virtio1": (0, 134217728)}, 12.5)


def test_report_line_before_any_device_has_no_devices() -> None:
    report = Report.parse("kvmmem-guest: memtotal_kb=250568 online_blocks=2 virtio_mem=", 1.0)
    assert report is not None and report.devices == {}


def test_other_lines_are_not_reports() -> None:
    assert Report.parse("[    2.0] virtio_mem virtio0: plugged size: 0x0", 0.0) is None
    assert Report.parse("kvmmem-guest: memtotal_kb=x online_blocks=2 virtio_mem=", 0.0) is None


def test_probe_line_gives_device_field_and_value() -> None:
    m = PROBE.search("[   23.31] virtio_mem virtio1: start address: 0x140000000")
    assert m is not None and (m[1], m[2], int(m[3], 16)) == ("virtio1", "start address", 5 << 30)
    assert PROBE.search("virtio_mem virtio0: unknown field: 0x1") is None
