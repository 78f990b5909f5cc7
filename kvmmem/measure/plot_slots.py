"""Plot the memslot metadata of a bench_slots.py run: kernel memory against
plugged size, one line per memslot mode, log scales.

Both axes are symmetric-log (linear near zero), so "nothing plugged" and
"no metadata" stay on the plot instead of being dropped by a plain log
scale. Needs matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

MIB, GIB = 1 << 20, 1 << 30
STYLE = {"single": ("tab:red", "s"), "usable": ("tab:orange", "^"), "dynamic": ("tab:green", "o"),
         "exact": ("tab:blue", "x")}
LABEL_OFFSET = {"single": (4, 6), "usable": (-30, 6), "dynamic": (6, -12), "exact": (6, 8)}


def series(data: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """Per mode, (plugged GiB, metadata MiB) of every measured case, by plugged size."""
    out: dict[str, list[tuple[float, float]]] = {}
    for case in data["cases"]:
        if case.get("kernel_bytes") is None:
            continue
        out.setdefault(case["mode"], []).append((case["plugged"] / GIB, case["kernel_bytes"] / MIB))
    return {mode: sorted(points) for mode, points in out.items()}


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for mode, points in series(data).items():
        color, marker = STYLE.get(mode, ("tab:blue", "x"))
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker=marker, color=color, label=mode)
        for x, y in points:
            ax.annotate(f"{y:.1f}" if y < 100 else f"{y:.0f}", (x, y), textcoords="offset points",
                        xytext=LABEL_OFFSET.get(mode, (4, 6)), fontsize=7, color=color)
    not_possible = sorted({c["mode"] for c in data["cases"] if c.get("not_possible")})
    qemu = data.get("qemu") or {}
    if qemu.get("kernel_bytes") is not None:
        y = (qemu["kernel_bytes"] - qemu["baseline_bytes"]) / MIB
        ax.plot([0], [y], marker="*", markersize=12, color="tab:purple", linestyle="none",
                label=f"QEMU {qemu.get('version', '')} (nothing plugged)")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_yscale("symlog", linthresh=0.1)
    plugged = sorted({c["plugged"] / GIB for c in data["cases"]})
    ax.set_xticks(plugged, [f"{p:g}" for p in plugged])
    ax.set_xlabel("plugged (GiB)")
    ax.set_ylabel("KVM memslot metadata (MiB, kernel memory\nminus the same VM without device)")
    size = data["device_size"]
    title = f"{size // (1 << 40)} TiB" if size % (1 << 40) == 0 else f"{size // GIB} GiB"
    ax.set_title(f"virtio-mem device of {title}: memslot metadata by mode")
    if not_possible:
        ax.text(0.02, 0.02, "not possible here: " + ", ".join(not_possible), transform=ax.transAxes,
                fontsize=8, color="gray")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json", type=Path, help="JSON written by scripts/bench_slots.py --json")
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/slots-1t.png"),
                        help="PNG to write (default docs/slots-1t.png)")
    args = parser.parse_args(argv)
    plot(json.loads(args.json.read_text()), args.output)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
