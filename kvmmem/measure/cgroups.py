"""Memory cgroups for kernel-memory measurements: finding a usable v1 or v2
hierarchy, making and removing a cgroup, moving a process into it and reading
its kernel charge. :mod:`kvmmem.measure.kmem` runs work in such a cgroup.

Measurement cgroups are made inside the caller's own cgroup (so limits and
accounting of the caller's ancestors still apply), or inside the directory
named by ``parent=`` or the ``KVMMEM_KMEM_PARENT`` environment variable.
"""

from __future__ import annotations

import errno
import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path

PARENT_ENV = "KVMMEM_KMEM_PARENT"
CGROUP1, CGROUP2 = "cgroup1", "cgroup2"
V2_KERNEL_PARTS = ("slab", "vmalloc", "kernel_stack", "pagetables", "sec_pagetables", "percpu")
RMDIR_WAIT_S = 2.0

_names = itertools.count()


class KmemError(RuntimeError):
    """A kernel-memory measurement went wrong."""


class KmemUnavailable(KmemError):
    """No memory cgroup can be used here; the message says why."""


# ----------------------------------------------------------------- /proc parsing

@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo``, the fields kmem needs."""

    root: str
    mount_point: Path
    fstype: str
    super_options: frozenset[str]


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a ``/proc/*/mountinfo`` text; malformed lines are skipped."""
    mounts = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, extra = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(extra) < 3:
            continue
        mounts.append(Mount(_unescape(fields[3]), Path(_unescape(fields[4])), extra[0],
                            frozenset(extra[2].split(","))))
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """Map each controller (and ``""`` for the v2 line) to the cgroup path."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            paths[controller] = parts[2]
    return paths


def parse_flat_keyed(text: str) -> dict[str, int]:
    """``key value`` lines (``memory.stat``, ``/proc/meminfo`` without units)."""
    out = {}
    for line in text.splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def vmalloc_used() -> int | None:
    """Machine-wide ``VmallocUsed`` of ``/proc/meminfo`` in bytes, if present."""
    try:
        kib = parse_flat_keyed(Path("/proc/meminfo").read_text()).get("VmallocUsed")
    except OSError:
        return None
    return None if kib is None else kib * 1024


def v2_kernel_bytes(stat: dict[str, int]) -> int:
    """Kernel memory from a cgroup2 ``memory.stat``: see the module docstring."""
    if "kernel" in stat:
        return stat["kernel"]
    if not any(k in stat for k in V2_KERNEL_PARTS):
        raise KmemError("memory.stat has neither 'kernel' nor any of " + ", ".join(V2_KERNEL_PARTS))
    return sum(stat.get(k, 0) for k in V2_KERNEL_PARTS)


# ----------------------------------------------------------------- cgroups

class MemCgroup:
    """One measurement cgroup: join it, read it, remove it."""

    def __init__(self, path: Path, backend: KmemBackend) -> None:
        self.path = path
        self.backend = backend

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into this cgroup."""
        try:
            (self.path / "cgroup.procs").write_text(f"{pid}\n")
        except OSError as exc:
            raise KmemUnavailable(f"cannot move pid {pid} into {self.path}: {exc.strerror}") from None

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def kernel_bytes(self) -> int:
        if self.backend.kind == CGROUP1:
            return int((self.path / "memory.kmem.usage_in_bytes").read_text())
        return v2_kernel_bytes(parse_flat_keyed((self.path / "memory.stat").read_text()))

    def peak_kernel_bytes(self) -> int | None:
        if self.backend.kind == CGROUP1:
            return int((self.path / "memory.kmem.max_usage_in_bytes").read_text())
        return None

    def reset_peak(self) -> None:
        if self.backend.kind == CGROUP1:
            (self.path / "memory.kmem.max_usage_in_bytes").write_text("0\n")

    def remove(self) -> None:
        """rmdir, waiting briefly for exiting tasks; processes are never moved."""
        deadline = time.monotonic() + RMDIR_WAIT_S
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise KmemError(f"cannot remove {self.path}: {exc.strerror}; processes still "
                                    f"in it: {self.pids()} (left in place)") from None
                time.sleep(0.01)


@dataclass(frozen=True)
class KmemBackend:
    """A usable memory-cgroup hierarchy and the directory to make cgroups in."""

    kind: str
    mount: Mount
    parent: Path

    def create(self) -> MemCgroup:
        """Make a fresh, empty measurement cgroup under ``parent``."""
        if self.kind == CGROUP2:
            self._enable_memory_controller()
        while True:
            path = self.parent / f"kvmmem-kmem-{os.getpid()}-{next(_names)}"
            try:
                path.mkdir()
                return MemCgroup(path, self)
            except FileExistsError:
                continue
            except OSError as exc:
                raise KmemUnavailable(f"{self.kind}: cannot create {path}: {exc.strerror}") from None

    def _enable_memory_controller(self) -> None:
        control = self.parent / "cgroup.subtree_control"
        if "memory" in _read_words(control):
            return
        try:
            control.write_text("+memory\n")
        except OSError as exc:
            raise KmemUnavailable(
                f"cgroup2: cannot enable the memory controller in {control}: {exc.strerror}"
                f"{_V2_INTERNAL_HINT if exc.errno == errno.EBUSY else ''}") from None

    def cgroup_dir_of(self, pid: int | str = "self") -> Path:
        """The directory of the cgroup that ``pid`` is in, in this hierarchy."""
        paths = parse_proc_cgroup(Path(f"/proc/{pid}/cgroup").read_text())
        return _cgroup_dir(self.mount, paths["memory" if self.kind == CGROUP1 else ""])


_V2_INTERNAL_HINT = (" (a non-root cgroup2 cgroup that has processes of its own cannot hand "
                     "controllers to children; set parent= or " + PARENT_ENV + " to a cgroup "
                     "with memory delegated and no processes)")


def _cgroup_dir(mount: Mount, cgroup_path: str) -> Path:
    # A mount may show only a subtree (bind mount, cgroup namespace).
    rel = os.path.relpath(cgroup_path, mount.root)
    if rel.startswith(".."):
        raise KmemUnavailable(f"cgroup {cgroup_path} is outside the mount at {mount.mount_point} "
                              f"(which shows {mount.root})")
    return mount.mount_point / rel if rel != "." else mount.mount_point


def _read_words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError as exc:
        raise KmemUnavailable(f"cannot read {path}: {exc.strerror}") from None


def _probe(kind: str, mounts: list[Mount], paths: dict[str, str], parent: Path | None) -> KmemBackend:
    if kind == CGROUP1:
        found = [m for m in mounts if m.fstype == "cgroup" and "memory" in m.super_options]
        key, what = "memory", "no cgroup v1 hierarchy with the memory controller is mounted"
    else:
        found = [m for m in mounts if m.fstype == "cgroup2"]
        key, what = "", "no cgroup2 (unified) hierarchy is mounted"
    if parent is not None:
        found = [m for m in found if parent.is_relative_to(m.mount_point)]
        what = f"{parent} is not inside a mounted {'cgroup v1 memory' if key else 'cgroup2'} hierarchy"
    if not found:
        raise KmemUnavailable(f"{kind}: {what}")
    mount = found[0]
    if parent is None:
        if key not in paths:
            raise KmemUnavailable(f"{kind}: /proc/self/cgroup has no {'memory' if key else 'v2'} line")
        parent = _cgroup_dir(mount, paths[key])
    if kind == CGROUP1:
        if not (parent / "memory.kmem.usage_in_bytes").exists():
            raise KmemUnavailable(f"cgroup1: {parent} has no memory.kmem.usage_in_bytes "
                                  "(kernel without kmem accounting in cgroup v1)")
    else:
        controllers = _read_words(parent / "cgroup.controllers")
        if "memory" not in controllers:
            raise KmemUnavailable(
                f"cgroup2: the memory controller is not available in {parent} (cgroup.controllers: "
                f"{' '.join(controllers) or 'none'}); it is bound to a v1 hierarchy or not delegated")
        is_root = parent == mount.mount_point and mount.root == "/"
        if ("memory" not in _read_words(parent / "cgroup.subtree_control") and not is_root
                and _read_words(parent / "cgroup.procs")):
            raise KmemUnavailable(f"cgroup2: memory is not enabled in {parent}/cgroup.subtree_control "
                                  f"and cannot be{_V2_INTERNAL_HINT}")
    if not (os.access(parent, os.W_OK) and os.access(parent / "cgroup.procs", os.W_OK)):
        raise KmemUnavailable(f"{kind}: no permission to create cgroups in {parent} "
                              "(run as root or delegate that cgroup to this user)")
    return KmemBackend(kind, mount, parent)


def detect(parent: str | Path | None = None, *, mountinfo: str | None = None,
           self_cgroup: str | None = None) -> KmemBackend:
    """Find a usable backend, cgroup1 first, then cgroup2.

    ``parent`` (default: ``$KVMMEM_KMEM_PARENT``, else this process's own
    cgroup) is where measurement cgroups are made. ``mountinfo`` and
    ``self_cgroup`` replace the texts of ``/proc/self/mountinfo`` and
    ``/proc/self/cgroup`` (for tests). Raises :class:`KmemUnavailable` with
    the reason for each backend when none is usable.
    """
    parent = parent if parent is not None else os.environ.get(PARENT_ENV) or None
    mounts = parse_mountinfo(mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text())
    paths = parse_proc_cgroup(self_cgroup if self_cgroup is not None else Path("/proc/self/cgroup").read_text())
    reasons = []
    for kind in (CGROUP1, CGROUP2):
        try:
            return _probe(kind, mounts, paths, Path(parent) if parent is not None else None)
        except KmemUnavailable as exc:
            reasons.append(str(exc))
    raise KmemUnavailable("no usable memory cgroup for kernel-memory measurement: " + "; ".join(reasons))
