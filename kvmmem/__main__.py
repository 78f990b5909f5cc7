"""``kvmmem`` command line: ``kvmmem demo`` replays the example of QEMU's
virtio-mem separate-memslots RFC on this machine,
``kvmmem run`` starts a VM with QEMU-style options."""

from __future__ import annotations

import argparse
import sys

from kvmmem.kvm import KvmError
from kvmmem.units import parse_size


def _sizes(text: str) -> list[int]:
    try:
        return [parse_size(part) for part in text.split(",") if part]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _demo(args: argparse.Namespace) -> int:
    from kvmmem.measure.demo import run_demo
    from kvmmem.vmm.smoke import run_smoke

    report = run_smoke()
    print(f"KVM API {report.api_version}, {report.max_memslots} memslots per VM "
          f"(KVM_CAP_NR_MEMSLOTS), USER_MEMORY2 {'yes' if report.user_memory2 else 'no'}, "
          f"MEMORY_FAULT_INFO {'yes' if report.memory_fault_info else 'no'}; a guest ran: "
          f"{' -> '.join(report.exits)}, said {report.guest_said.decode(errors='replace')!r}")
    print()
    run_demo(modes=args.mode.split(","), size=args.size, requested=args.requested,
             reboot_last=not args.no_reboot, driver=args.driver)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        from kvmmem.migration.qmp import run_extension
        from kvmmem.vmm.cli import main as run_main

        return run_main(argv[1:], [run_extension])
    parser = argparse.ArgumentParser(prog="kvmmem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="replay the QEMU RFC's example: a 500G virtio-mem device resized "
                          "2G, 20G, 5G + reboot, in usable and dynamic memslot modes")
    demo.add_argument("--mode", default="usable,dynamic",
                      help="memslot modes to run, comma-separated (single, usable, dynamic, exact)")
    demo.add_argument("--size", type=_size, default=parse_size("500G"), help="device size")
    demo.add_argument("--requested", type=_sizes, default=_sizes("2G,20G,5G"),
                      help="requested sizes in order, comma-separated")
    demo.add_argument("--no-reboot", action="store_true",
                      help="do not reboot after the last requested size")
    demo.add_argument("--driver", choices=("guest", "host"), default="guest",
                      help="who sends the requests: the test guest under KVM (default) "
                      "or a host-side stand-in")
    demo.set_defaults(func=_demo)
    sub.add_parser("run", help="start a VM, options spelled as QEMU's (kvmmem run -h)")
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (KvmError, ValueError) as exc:
        print(f"kvmmem: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
