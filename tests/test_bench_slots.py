"""kvmmem.measure.bench_slots (scripts/bench_slots.py): its pure parts (sizes, the not-possible estimate,
the tables, the target verdicts, JSON) and one tiny real run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import kvmmem.measure.bench_slots as bs
from kvmmem.measure import plot_slots

MiB, GiB, TiB = bs.MIB, bs.GIB, bs.TIB
HOST_24G = 24 * GiB


def case(mode: str, plugged: int, kernel: int, create: float = 0.001, **kw) -> bs.Case:  # type: ignore[no-untyped-def]
    values = dict(kernel_bytes=kernel, memslots=1, memslot_size=GiB, create_s=create, plug_s=0.001,
                  unplug_s=0.08, rss_before=100 * MiB, rss_touched=1124 * MiB, rss_after=100 * MiB)
    values.update(kw)
    return bs.Case(mode, TiB, plugged, **values)


def make_run(cases: list[bs.Case], size: int = TiB) -> bs.Run:
    host = {"kernel": "6.x", "mem_total": HOST_24G, "backend": "cgroup1", "python": "3.11"}
    return bs.Run(size, host, 3 * MiB, [3 * MiB, 3 * MiB], cases)


# -- sizes and modes -----------------------------------------------------------

@pytest.mark.parametrize("text, size", [("0", 0), ("1", GiB), ("64G", 64 * GiB), ("1T", TiB),
                                        ("512M", 512 * MiB), ("64TiB", 64 * TiB), ("16 gib", 16 * GiB)])
def test_parse_size(text: str, size: int) -> None:
    assert bs.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "1e3", "-1", "1X", "G"])
def test_parse_size_refuses_garbage(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        bs.parse_size(text)


def test_parse_sizes_sorts_and_dedups() -> None:
    assert bs.parse_sizes("64,0,1,16,1G") == [0, GiB, 16 * GiB, 64 * GiB]


def test_parse_modes_keeps_canonical_order_and_refuses_unknown() -> None:
    assert bs.parse_modes("dynamic,single") == ["single", "dynamic"]
    with pytest.raises(argparse.ArgumentTypeError, match="modes must be among"):
        bs.parse_modes("dynamic,sparse")


# -- the not-possible estimate -------------------------------------------------

def test_single_64t_is_not_possible_with_the_estimate() -> None:
    reason = bs.not_possible_reason("single", 64 * TiB, 0, HOST_24G)
    assert reason is not None
    assert "160.6 GiB" in reason and "65536 GiB" in reason and "24.0 GiB" in reason


@pytest.mark.parametrize("mode", ["usable", "dynamic"])
def test_split_modes_of_64t_are_possible(mode: str) -> None:
    assert bs.not_possible_reason(mode, 64 * TiB, 64 * GiB, HOST_24G) is None


def test_single_1t_is_possible_but_not_on_a_tiny_host() -> None:
    assert bs.not_possible_reason("single", TiB, 0, HOST_24G) is None
    assert bs.not_possible_reason("single", TiB, 0, 4 * GiB) is not None


def test_plugged_beyond_the_device_is_not_possible() -> None:
    reason = bs.not_possible_reason("dynamic", 4 * GiB, 4 * GiB, HOST_24G)
    assert reason is not None and "exceed" in reason


# -- tables --------------------------------------------------------------------

def _columns(line: str) -> int:
    return line.count("|") - 1


def test_table_rows_have_the_header_s_column_count() -> None:
    run = make_run([case("dynamic", GiB, int(2.5 * MiB)),
                    bs.Case("single", 64 * TiB, 0, not_possible="needs 160 GiB"),
                    bs.Case("usable", TiB, 0, error="boom")])
    lines = bs.format_table(run).splitlines()
    assert len(lines) == 5
    assert {_columns(line) for line in lines} == {_columns(lines[0])}
    assert "not possible: needs 160 GiB" in lines[3] and "failed: boom" in lines[4]
    assert "| 2.5 |" in lines[2] and "1 x 1 GiB" in lines[2]


def test_rss_returned_percentage() -> None:
    c = case("dynamic", 0, 0, rss_before=200 * MiB, rss_after=202 * MiB)
    assert c.rss_returned_pct == pytest.approx(1.0)
    assert bs.Case("dynamic", TiB, 0).rss_returned_pct is None


# -- target verdicts -----------------------------------------------------------

def _verdicts(run: bs.Run) -> dict[str, bool | None]:
    return {t.split(":")[0]: ok for t, _, ok in bs.evaluate_targets(run)}


def test_targets_met() -> None:
    run = make_run([case("single", 0, 2566 * MiB, create=0.5), case("single", GiB, 2566 * MiB),
                    case("dynamic", 0, 10_000, create=0.001), case("dynamic", GiB, int(2.5 * MiB))])
    run.overheads = [bs.Overhead(110e-6, 101e-6, 100e-6, 1, 2), bs.Overhead(115e-6, 101e-6, 100e-6, 1, 2, others=1000)]
    verdicts = [ok for _, _, ok in bs.evaluate_targets(run)]
    assert len(verdicts) == 5 and all(verdicts)


def test_targets_missed() -> None:
    run = make_run([case("single", 0, 2566 * MiB, create=0.05), case("single", GiB, 2566 * MiB),
                    case("dynamic", 0, 2 * MiB, create=0.001, rss_after=102 * MiB),
                    case("dynamic", GiB, 10 * MiB)])
    run.overheads = [bs.Overhead(110e-6, 101e-6, 100e-6, 1, 2), bs.Overhead(150e-6, 101e-6, 100e-6, 1, 2, others=1000)]
    verdicts = [ok for _, _, ok in bs.evaluate_targets(run)]
    assert len(verdicts) == 5 and not any(verdicts)


def test_64t_target_needs_a_measured_dynamic_plug() -> None:
    run = make_run([bs.Case("dynamic", 64 * TiB, 0, error="ENOMEM")], size=64 * TiB)
    assert [ok for t, _, ok in bs.evaluate_targets(run) if "64 TiB" in t] == [False]
    run.cases.append(case("dynamic", GiB, 160 * MiB))
    assert [ok for t, _, ok in bs.evaluate_targets(run) if "64 TiB" in t] == [True]


# -- JSON and plot data ----------------------------------------------------------

def test_json_round_trip_keeps_the_report() -> None:
    run = make_run([case("single", 0, 2566 * MiB), case("dynamic", 0, 0),
                    bs.Case("single", TiB, GiB, not_possible="too big")])
    run.overheads = [bs.Overhead(120e-6, 101e-6, 100e-6, 3, 2, 110e-6, others=1000)]
    data = json.loads(json.dumps(bs.run_to_json(run)))
    assert data["overheads"][0]["device_ratio"] == pytest.approx(1.2)
    assert bs.format_report(bs.run_from_json(data)) == bs.format_report(run)


def test_json_of_a_run_before_several_overheads_still_reads() -> None:
    run = make_run([case("dynamic", 0, 0)])
    data = bs.run_to_json(run)
    del data["overheads"]
    data["overhead"] = {"device_change_s": 130e-6, "vm_change_s": 101e-6, "ioctl_change_s": 100e-6,
                        "rounds": 15, "batch": 10, "memory_change_s": 115e-6, "device_ratio": 1.3}
    old = bs.run_from_json(data)
    assert [(o.others, round(o.device_ratio, 2)) for o in old.overheads] == [(0, 1.3)]


def test_plot_series_skips_unmeasured_cases() -> None:
    run = make_run([case("dynamic", GiB, 2 * MiB), case("dynamic", 0, 0),
                    bs.Case("single", TiB, 0, not_possible="too big")])
    assert plot_slots.series(bs.run_to_json(run)) == {"dynamic": [(0.0, 0.0), (1.0, 2.0)]}


# -- a tiny real run -------------------------------------------------------------

@pytest.mark.kvm
def test_tiny_real_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run.json"
    assert bs.main(["--device-size", "4G", "--plugged", "0,1", "--modes", "single,dynamic",
                    "--baseline-runs", "1", "--no-overhead", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    cases = {(c["mode"], c["plugged"]): c for c in data["cases"]}
    assert set(cases) == {("single", 0), ("single", GiB), ("dynamic", 0), ("dynamic", GiB)}
    assert cases[("dynamic", 0)]["memslots"] == 0 and cases[("dynamic", GiB)]["memslots"] == 1
    assert cases[("single", 0)]["memslots"] == 1
    # one 4 GiB memslot carries more metadata than one 1 GiB memslot
    assert cases[("single", 0)]["kernel_bytes"] > cases[("dynamic", GiB)]["kernel_bytes"] > 0
    assert all(c["rss_touched"] - c["rss_before"] >= GiB // 2 for c in cases.values())
    assert "| 4 GiB | dynamic | 1 GiB |" in capsys.readouterr().out


@pytest.mark.kvm
def test_overhead_measurement_runs_among_other_memslots() -> None:
    from kvmmem.measure import bench_overhead
    o = bench_overhead.measure_overhead(rounds=3, others=3, batch=2)
    assert o.others == 3 and o.rounds == 3
    assert min(o.device_change_s, o.vm_change_s, o.ioctl_change_s, o.memory_change_s or 0) > 0
    table = bench_overhead.format_overheads([o])
    assert "among 3 memslots" in table and table.count("\n") == 5


def test_qemu_is_reported_measured_or_why_not() -> None:
    run = make_run([case("dynamic", 0, 0)])
    run.qemu = {"version": None, "command": "qemu-system-x86_64", "kernel_bytes": None,
                "error": "qemu-system-x86_64 is not installed"}
    assert "\nQEMU: not measured: qemu-system-x86_64 is not installed\n" in bs.format_report(run)
    run.qemu = {"version": "7.2.22", "command": "qemu-system-x86_64 -S", "kernel_bytes": 12 * MiB,
                "baseline_bytes": 2 * MiB}
    assert ("\nQEMU 7.2.22, `qemu-system-x86_64 -S`: 12.0 MiB kernel memory with the device, "
            "2.0 MiB without (difference 10.0 MiB)\n") in bs.format_report(run)
