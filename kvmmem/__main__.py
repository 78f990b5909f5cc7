"""``kvmmem`` command line: ``kvmmem demo``."""

from __future__ import annotations

import argparse
import sys

from kvmmem.kvm import KvmError


def _demo(_: argparse.Namespace) -> int:
    from kvmmem.vmm.smoke import run_smoke

    report = run_smoke()
    print(f"KVM API version      {report.api_version}")
    print(f"memslots per VM      {report.max_memslots} (KVM_CAP_NR_MEMSLOTS)")
    print(f"USER_MEMORY2         {'yes' if report.user_memory2 else 'no'}")
    print(f"MEMORY_FAULT_INFO    {'yes' if report.memory_fault_info else 'no'}")
    print(f"guest ran            exits {' -> '.join(report.exits)}, "
          f"said {report.guest_said.decode(errors='replace')!r} on port 0x10")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvmmem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the main demonstration").set_defaults(func=_demo)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KvmError as exc:
        print(f"kvmmem: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
