"""QEMU's kernel memory with an idle virtio-mem device, for comparison.

Starts ``qemu-system-x86_64 -S`` (Debian's package; not a dependency of
kvmmem) with 4 GiB of RAM, once without and once with one virtio-mem device
of the given size, nothing plugged, each in its own memory cgroup, and reads
the kernel charge once it stops growing. bench_slots.py --qemu puts the
result beside kvmmem's; run alone it prints both numbers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from kvmmem.measure import kmem

GIB = 1 << 30
MIB = 1 << 20
QEMU = "qemu-system-x86_64"
QEMU_SETTLE_S, QEMU_TIMEOUT_S = 1.0, 60.0


def qemu_command(device_size: int | None) -> list[str]:
    """An idle (``-S``) QEMU with 4 GiB of RAM and, if a size is given, one
    virtio-mem device of that size with nothing plugged."""
    maxmem = 4 * GIB + (device_size or 0) + 4 * GIB
    cmd = [QEMU, "-enable-kvm", "-cpu", "qemu64,host-phys-bits=on", "-S", "-display", "none",
           "-nodefaults", "-monitor", "none", "-m", f"4G,maxmem={maxmem // GIB}G,slots=4"]
    if device_size:
        cmd += ["-object", f"memory-backend-ram,id=mem0,size={device_size // GIB}G,reserve=off",
                "-device", "virtio-mem-pci,id=vm0,memdev=mem0"]
    return cmd


def _qemu_kernel_bytes(cmd: list[str], backend: kmem.KmemBackend) -> int:
    """Kernel charge of one QEMU process in its own cgroup, once it stops growing."""
    cgroup = backend.create()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, preexec_fn=lambda: cgroup.add(os.getpid()))
        try:
            deadline, last, stable_since = time.monotonic() + QEMU_TIMEOUT_S, -1, time.monotonic()
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                    raise RuntimeError(f"QEMU exited with {proc.returncode}: {err[-300:]}")
                now = cgroup.kernel_bytes()
                if now != last:
                    last, stable_since = now, time.monotonic()
                elif time.monotonic() - stable_since >= QEMU_SETTLE_S:
                    return now
                time.sleep(0.1)
            raise RuntimeError(f"QEMU's kernel memory did not settle within {QEMU_TIMEOUT_S:.0f} s")
        finally:
            proc.kill()
            proc.wait()
    finally:
        cgroup.remove()


def measure_qemu(device_size: int, backend: kmem.KmemBackend) -> dict[str, Any]:
    """QEMU's kernel memory with and without the device (item 3 of issue 7)."""
    if shutil.which(QEMU) is None:
        return {"version": None, "command": QEMU, "error": f"{QEMU} is not installed"}
    version = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    version = version.split("version")[-1].strip().split()[0] if "version" in version else version
    cmd = qemu_command(device_size)
    out: dict[str, Any] = {"version": version, "command": " ".join(cmd)}
    try:
        out["baseline_bytes"] = _qemu_kernel_bytes(qemu_command(None), backend)
        out["kernel_bytes"] = _qemu_kernel_bytes(cmd, backend)
    except (RuntimeError, OSError, kmem.KmemError) as exc:
        out["error"] = str(exc)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device-size-gib", type=int, default=1024, help="device size in GiB (default 1024)")
    args = parser.parse_args(argv)
    out = measure_qemu(args.device_size_gib * GIB, kmem.detect())
    if "error" in out:
        print(f"QEMU not measured: {out['error']}")
        return 1
    print(f"QEMU {out['version']}: {out['kernel_bytes'] / MIB:.1f} MiB kernel memory with the device, "
          f"{out['baseline_bytes'] / MIB:.1f} MiB without")
    return 0


if __name__ == "__main__":
    sys.exit(main())
