"""The one import point of the compiled KVM bindings (``kvmmem._kvm_cffi``)."""

from __future__ import annotations

try:
    from kvmmem._kvm_cffi import ffi, lib
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "kvmmem's KVM bindings are not built: run `make` (or "
        "`python cdefs/build_kvm.py`) in the kvmmem checkout"
    ) from exc

__all__ = ["ffi", "lib"]
