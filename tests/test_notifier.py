"""Notifier lists (kvmmem.devices.notifier) and the device's use of them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kvmmem.devices.notifier import Notifier


def test_every_observer_is_called_in_order_and_can_leave() -> None:
    seen: list[tuple[str, int]] = []
    notifiers: Notifier[int] = Notifier()
    assert not notifiers
    first = notifiers.add(lambda v: seen.append(("a", v)))
    notifiers.add(lambda v: seen.append(("b", v)))
    notifiers.notify(1)
    notifiers.remove(first)
    assert first not in notifiers and len(notifiers) == 1
    notifiers.notify(2)
    assert seen == [("a", 1), ("b", 1), ("b", 2)]
    with pytest.raises(ValueError):
        notifiers.remove(first)


def test_a_failing_observer_does_not_starve_the_others() -> None:
    seen: list[int] = []
    notifiers: Notifier[int] = Notifier()

    def broken(_: int) -> None:
        raise RuntimeError("observer bug")

    notifiers.add(broken)
    notifiers.add(seen.append)
    with pytest.raises(RuntimeError, match="observer bug"):
        notifiers.notify(7)
    assert seen == [7]


def test_the_devices_package_imports_neither_kvm_nor_vmm() -> None:
    """The device reaches KVM only through the memory layer and never calls up."""
    package = Path(__file__).resolve().parent.parent / "kvmmem" / "devices"
    offenders = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names
                          if n.startswith(("kvmmem.kvm", "kvmmem.vmm"))]
    assert offenders == []
