"""The import directions between kvmmem's packages (DESIGN.md, Layers).

An ``ast`` walk of every module under ``kvmmem/``: each import of another
kvmmem package, at the top, inside a function or under ``TYPE_CHECKING``,
must be an edge of ``ALLOWED``. Imports inside one package are free.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "kvmmem"

# package -> the kvmmem packages it may import. "kvmmem" is the package's own
# __init__ (its version), "units" the size parser, "_kvm_cffi" the compiled
# extension, "__main__" the command line.
ALLOWED: dict[str, set[str]] = {
    "_kvm_cffi": set(),
    "units": set(),
    "kvmmem": set(),
    "kvm": {"_kvm_cffi"},
    "memory": {"kvm"},
    "devices": {"memory"},
    "virtio": {"memory", "kvm"},
    "vhost": {"memory", "kvm", "virtio", "devices"},
    "vmm": {"kvmmem", "units", "kvm", "memory", "devices", "virtio", "vhost"},
    "migration": {"units", "kvm", "memory", "devices", "virtio", "vhost", "vmm"},
    "measure": {"units", "kvm", "memory", "devices", "virtio", "vhost", "vmm", "migration"},
    "__main__": {"units", "kvm", "vmm", "measure", "migration"},
}

def node_of_file(path: Path, root: Path) -> str:
    """The layer a module of the tree at ``root`` belongs to."""
    parts = path.relative_to(root).with_suffix("").parts
    if len(parts) == 1:
        return "kvmmem" if parts[0] == "__init__" else parts[0]
    return parts[0]


def node_of_module(module: str) -> str | None:
    """The layer of an absolute module name, None outside kvmmem."""
    parts = module.split(".")
    if parts[0] != "kvmmem":
        return None
    return parts[1] if len(parts) > 1 else "kvmmem"


def imported_modules(tree: ast.AST, package: str,
                     subpackages: set[str]) -> list[tuple[str, int]]:
    """Absolute names of the modules ``tree`` imports (``package`` resolves
    relative imports), with line numbers."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "kvmmem":
                # `from kvmmem import memory` imports a package, `__version__` an attribute
                found += [(f"kvmmem.{alias.name}" if alias.name in subpackages else module,
                           node.lineno) for alias in node.names]
            else:
                found.append((module, node.lineno))
    return found


def import_edges(root: Path) -> dict[tuple[str, str], list[str]]:
    """(importing layer, imported layer) -> where, for every cross-layer import."""
    edges: dict[tuple[str, str], list[str]] = {}
    subpackages = {p.stem for p in root.iterdir() if p.is_dir() or p.suffix == ".py"}
    for path in sorted(root.rglob("*.py")):
        source = node_of_file(path, root)
        rel = path.relative_to(root.parent)
        package = ".".join(rel.with_suffix("").parts[:-1])
        for module, line in imported_modules(ast.parse(path.read_text(), str(path)), package,
                                         subpackages):
            target = node_of_module(module)
            if target is None or target == source:
                continue
            edges.setdefault((source, target), []).append(f"{rel}:{line}")
    return edges


def violations(edges: dict[tuple[str, str], list[str]]) -> list[str]:
    return [f"{src} -> {dst} ({', '.join(where)})" for (src, dst), where in sorted(edges.items())
            if dst not in ALLOWED.get(src, set())]


def test_every_layer_is_in_the_table() -> None:
    layers = {node_of_file(path, ROOT) for path in ROOT.rglob("*.py")}
    assert layers <= set(ALLOWED), f"add {sorted(layers - set(ALLOWED))} to ALLOWED"


def test_the_layers_have_no_cycle() -> None:
    """ALLOWED is a DAG: no package may reach itself through the packages it imports."""
    def reach(layer: str, seen: set[str]) -> set[str]:
        for dst in ALLOWED[layer] - seen:
            seen.add(dst)
            reach(dst, seen)
        return seen
    assert [layer for layer in ALLOWED if layer in reach(layer, set())] == []


def test_imports_follow_the_layers() -> None:
    assert violations(import_edges(ROOT)) == []


@pytest.mark.parametrize("source, target, bad", [
    ("devices/x.py", "from kvmmem.vmm.machine import Machine\n", True),
    ("devices/x.py", "def f():\n    import kvmmem.measure.kmem\n", True),
    ("memory/x.py", "from ..devices import virtio_mem\n", True),
    ("kvm/x.py", "from kvmmem import memory\n", True),
    ("devices/x.py", "from kvmmem.vhost.frontend import VhostUserFrontend\n", True),
    ("devices/x.py", "from kvmmem.virtio.mmio_regs import QueueState\n", True),
    ("vhost/x.py", "if TYPE_CHECKING:\n    from kvmmem.vmm.machine_memory import MachineMemory\n",
     True),
    ("vhost/x.py", "from kvmmem.devices.notifier import Notifier\n", False),
    ("vmm/x.py", "from kvmmem.devices.virtio_mem import VirtioMem\n", False),
    ("memory/x.py", "from .region import MemoryRegion\n", False),
])
def test_the_walk_sees_a_wrong_direction(tmp_path: Path, source: str, target: str,
                                         bad: bool) -> None:
    root = tmp_path / "kvmmem"
    for layer in ("kvm", "memory", "devices", "virtio", "vhost", "vmm"):
        (root / layer).mkdir(parents=True)
    (root / source).write_text(target)
    assert bool(violations(import_edges(root))) is bad
