"""`kvmmem run`: QEMU-spelled options, one-line refusals, a real boot."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmmem.vmm.cli import OptionError, parse_args, parse_keyval, parse_machine

ROOT = Path(__file__).resolve().parents[1]
GUEST = ROOT / "build" / "guest" / "guest.elf"
GiB, MiB = 1 << 30, 1 << 20


def config(*argv: str):  # type: ignore[no-untyped-def]
    return parse_machine(parse_args(["-kernel", "k", *argv]), None)


def test_keyval_follows_qemu_spelling() -> None:
    assert parse_keyval("-m", "4G,maxmem=1028G,slots=4", "size") == \
        {"size": "4G", "maxmem": "1028G", "slots": "4"}
    for bad in ("4G,maxmem", "4G,slots=1,slots=2", "4G,=3"):
        with pytest.raises(OptionError):
            parse_keyval("-m", bad, "size")


def test_options_build_the_machine_config() -> None:
    cfg = config("-m", "4G,maxmem=1028G,slots=13", "-object", "memory-backend-ram,id=mem0,size=500G",
                 "-device", "virtio-mem,id=vmem0,memdev=mem0,requested-size=2G,block-size=4M,"
                 "memslots=usable,protect=block,max-memslots=64", "-append", "x=1", "-no-reboot")
    assert (cfg.ram_size, cfg.maxmem, cfg.slots, cfg.cmdline, cfg.no_reboot) == \
        (4 * GiB, 1028 * GiB, 13, "x=1", True)
    props = cfg.memory_devices[0]
    assert (props.id, props.memdev.name, props.memdev.size) == ("vmem0", "mem0", 500 * GiB)
    assert (props.requested_size, props.block_size, props.max_memslots) == (2 * GiB, 4 * MiB, 64)
    assert (props.memslots.value, props.protect.value) == ("usable", "block")
    props.memdev.close()


@pytest.mark.parametrize("mode", ["single", "usable", "dynamic", "exact"])
def test_every_memslot_mode_is_an_option(mode: str) -> None:
    cfg = config("-m", "1G,maxmem=9G", "-object", "memory-backend-ram,id=m,size=8G",
                 "-device", f"virtio-mem,id=v,memdev=m,memslots={mode}")
    assert cfg.memory_devices[0].memslots.value == mode
    cfg.memory_devices[0].memdev.close()  # type: ignore[union-attr]


def test_merge_delay_is_an_option_of_milliseconds() -> None:
    cfg = config("-m", "1G,maxmem=9G", "-object", "memory-backend-ram,id=m,size=8G",
                 "-device", "virtio-mem,id=v,memdev=m,memslots=exact,merge-delay=0x10")
    assert cfg.memory_devices[0].merge_delay == 16
    cfg.memory_devices[0].memdev.close()  # type: ignore[union-attr]
    default = config("-m", "1G,maxmem=9G", "-device", "virtio-mem,id=v,size=1G").memory_devices[0]
    assert default.merge_delay == 100
    default.memdev.close()  # type: ignore[union-attr]
    for bad, why in (("soon", "merge-delay='soon' is not a number"),
                     ("-1", "'merge-delay' -1 must be 0..3600000 milliseconds"),
                     ("3600001", "'merge-delay' 3600001 must be 0..3600000 milliseconds")):
        with pytest.raises(OptionError) as info:
            config("-m", "1G,maxmem=9G", "-device", f"virtio-mem,id=v,size=1G,merge-delay={bad}")
        assert info.value.option == "-device" and why in str(info.value), str(info.value)


def test_bare_sizes_count_as_qemu_counts_them() -> None:
    # QEMU: -m 512 is 512 MiB, maxmem and property sizes are bytes
    assert config("-m", "0.5").ram_size == 512 << 10
    cfg = config("-m", "512,maxmem=0x40000000", "-object", "memory-backend-ram,id=m,size=1073741824",
                 "-device", "virtio-mem,id=v,memdev=m,requested-size=4194304")
    assert (cfg.ram_size, cfg.maxmem) == (512 * MiB, GiB)
    props = cfg.memory_devices[0]
    assert (props.memdev.size, props.requested_size) == (GiB, 4 * MiB)
    props.memdev.close()


@pytest.mark.parametrize("argv,option,why", [
    (["-m", "4Q"], "-m", "is not a size"),
    (["-m", "4G,maxmem=8G,color=red"], "-m", "unknown key"),
    (["-m", "1G", "-object", "memory-backend-file,id=m,size=1G"], "-object", "is not one of"),
    (["-m", "1G", "-object", "memory-backend-ram,id=m"], "-object", "needs id= and size="),
    (["-m", "1G", "-device", "virtio-net,id=n"], "-device", "only virtio-mem"),
    (["-m", "1G", "-device", "virtio-mem,id=v,memdev=none"], "-device", "no -object"),
    (["-m", "1G", "-object", "memory-backend-ram,id=m,size=1G",
      "-device", "virtio-mem,id=v,memdev=m,block-size=3M"], "-device", "power of two"),
    (["-m", "1G", "-object", "memory-backend-ram,id=m,size=1G",
      "-device", "virtio-mem,id=v,memdev=m,memslots=some"], "-device", "must be one of"),
    # QEMU's id_wellformed(): an id names a QOM child, so no '/' and not empty
    (["-m", "1G,maxmem=3G", "-object", "memory-backend-ram,id=,size=1G"], "-object",
     "Parameter 'id' expects an identifier"),
    (["-m", "1G,maxmem=3G", "-object", "memory-backend-ram,id=m,size=1G",
      "-device", "virtio-mem,id=a/b,memdev=m"], "-device", "Parameter 'id' expects an identifier"),
    (["-m", "1G", "-chardev", "socket,id=1c,path=/x"], "-chardev",
     "Parameter 'id' expects an identifier"),
    # QMP names a device by its id (/machine/peripheral/ID); not a Python TypeError
    (["-m", "1G,maxmem=3G", "-object", "memory-backend-ram,id=m,size=1G",
      "-device", "virtio-mem,memdev=m"], "-device", "virtio-mem needs id="),
])
def test_bad_options_are_refused_naming_the_option(argv, option: str, why: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OptionError) as info:
        config(*argv)
    assert info.value.option == option and why in str(info.value)


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmmem", "run", *argv], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_refusal_is_one_line_on_stderr() -> None:
    out = run("-m", "512X", "-kernel", "k")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        ("kvmmem run: -m: size='512X' is not a size: expected a non-negative number with an "
        "optional suffix B, K, M, G, T, P or E (examples: 512M, 2G)")]


# Every field that takes a size, as (option, the option's text with {} for the value).
SIZE_FIELDS = [
    ("-m", "size", ["-m", "{}"]),
    ("-m", "maxmem", ["-m", "1G,maxmem={}"]),
    ("-object", "size", ["-m", "1G", "-object", "memory-backend-ram,id=m,size={}"]),
    ("-device", "size", ["-m", "1G,maxmem=9G", "-device", "virtio-mem,id=v,size={}"]),
    ("-device", "block-size", ["-m", "1G,maxmem=9G", "-device", "virtio-mem,id=v,size=1G,block-size={}"]),
    ("-device", "requested-size", ["-m", "1G,maxmem=9G", "-device",
                                   "virtio-mem,id=v,size=1G,requested-size={}"]),
    ("-device", "memaddr", ["-m", "1G,maxmem=9G", "-device", "virtio-mem,id=v,size=1G,memaddr={}"]),
    ("-machine", "memslot-metadata-limit", ["-m", "1G", "-machine", "pc,memslot-metadata-limit={}"]),
]
# Not sizes: Python-isms, overflows, signs, exponents, inf/nan, 2^64 and more, odd digits.
BAD_SIZES = ["2**70", "1180591620717411303424", "18446744073709551616", "16E", "17179869184G",
             "infG", "inf", "nanG", "1e30G", "1e3", "-1G", "-1", "+1G", "", "G", "0x", "0x1.8G",
             "1.5.5G", "1_0G", "\u0661G", "1Q", "0.5", "1G5"]


@pytest.mark.parametrize("option,key,argv,value", [
    pytest.param(option, key, argv, value, id=f"{option}:{key}-{value}")
    for option, key, argv in SIZE_FIELDS for value in BAD_SIZES
    # a bare -m size counts MiB, as in QEMU: there 0.5 is 512 KiB (checked below)
    if (option, key, value) != ("-m", "size", "0.5")])
def test_every_size_field_refuses_every_bad_size(option: str, key: str, argv: list[str],
                                                 value: str) -> None:
    with pytest.raises(OptionError) as info:
        config(*[a.format(value) for a in argv])
    assert info.value.option == option
    assert f"{key}={value!r} is not a size: " in str(info.value)


@pytest.mark.parametrize("argv,line", [
    (["-m", "maxmem=8G"], "-m: Parameter 'size' is missing"),
    (["-m", "1G", "-object", "id=x"], "-object: Parameter 'qom-type' is missing"),
    (["-m", "1G", "-device", "id=v"], "-device: Parameter 'driver' is missing"),
    (["-m", "1G", "-qmp", "server=on"], "-qmp: no socket given: the first item must be unix:PATH"),
    (["-m", "infG"], ("-m: size='infG' is not a size: expected a non-negative number with an "
                     "optional suffix B, K, M, G, T, P or E (examples: 512M, 2G)")),
    (["-m", "1G", "-object", "memory-backend-ram,id=m,size=1e30G"],
     ("-object: size='1e30G' is not a size: expected a non-negative number with an optional "
     "suffix B, K, M, G, T, P or E (examples: 512M, 2G)")),
    (["-m", "1G,maxmem=1180591620717411303424"],
     ("-m: maxmem='1180591620717411303424' is not a size: too large (sizes are below 2^64 "
     "bytes) (examples: 512M, 2G)")),
    (["-m", "-1G"], ("-m: size='-1G' is not a size: negative sizes are not allowed "
                    "(examples: 512M, 2G)")),
])
def test_bad_options_end_in_one_line_and_status_2_not_a_traceback(argv: list[str],
                                                                   line: str) -> None:
    out = run(*argv, "-kernel", "k")
    assert (out.returncode, out.stderr.splitlines()) == (2, [f"kvmmem run: {line}"])


DEVICE = ["-m", "512M,maxmem=8G", "-object", "memory-backend-ram,id=mem0,size=4G",
          "-device", "virtio-mem,id=vmem0,memdev=mem0,requested-size=1G"]


@pytest.mark.kvm
def test_run_boots_the_guest_and_returns_its_exit_status(tmp_path: Path) -> None:
    log = tmp_path / "serial.txt"
    out = run(*DEVICE, "-kernel", str(GUEST), "-append", "kvmmem.steps=8",
              "-serial", f"file:{log}")
    assert out.returncode == 1, out.stderr       # guest wrote 0 to port 0xf4: (0 << 1) | 1
    text = log.read_text()
    assert "virtio_mmio.device=512@0xd0000000:5" in text
    assert "plugged=1073741824 requested=1073741824 ok" in text


@pytest.mark.kvm
def test_no_reboot_exits_when_the_guest_resets() -> None:
    out = run(*DEVICE, "-kernel", str(GUEST), "-append", "kvmmem.reset=1", "-no-reboot")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("resetting") == 1


LONG_APPEND = "x" * 5000


@pytest.mark.kvm
@pytest.mark.parametrize("argv,option,why", [
    (["-m", "1G,maxmem=512M"], "-m", "maxmem 0x20000000 is below the ram size 0x40000000"),
    (["-m", "1G,slots=300"], "-m", "slots=300 is outside 0..256"),
    (["-m", "1G,maxmem=300T"], "-m", "beyond the 0x1000000000000 bytes of guest-physical"),
    (["-m", "1G", "-kernel", "/nonexistent/vmlinux"], "-kernel", "cannot read kernel"),
    (["-m", "1G", "-append", LONG_APPEND], "-append", "must be at most 4095 bytes"),
    (["-m", "1G", "-serial", "file:/nonexistent/serial.log"], "-serial", "cannot open"),
    (["-m", "1G,maxmem=9G", "-device", "virtio-mem,id=v,size=64G"], "-device", "does not fit"),
    (["-m", "1G,maxmem=9G", "-device", "virtio-mem,id=v,size=9E"], "-device",
     "v-memdev: cannot allocate size=0x9000000000000000"),
    (["-m", "1G,maxmem=9G", "-device", "virtio-mem,id=v,size=1G,block-size=0"], "-device",
     "'block-size' property has to be at least 0x100000"),
], ids=["maxmem<ram", "slots", "maxmem-beyond-map", "kernel", "append", "serial", "fit",
        "device-size", "block-size-0"])
def test_errors_below_the_command_line_name_their_option(argv: list[str], option: str,
                                                         why: str) -> None:
    if "-kernel" not in argv:
        argv = [*argv, "-kernel", str(GUEST)]
    out = run(*argv, "-serial", "none") if "-serial" not in argv else run(*argv)
    lines = out.stderr.splitlines()
    assert (out.returncode, len(lines)) == (2, 1), out.stderr
    assert lines[0].startswith(f"kvmmem run: {option}: ") and why in lines[0], lines[0]


def test_block_size_zero_is_refused_not_taken_as_the_default() -> None:
    with pytest.raises(OptionError) as info:
        config("-m", "1G,maxmem=9G", "-device", "virtio-mem,id=v,size=1G,block-size=0")
    assert info.value.option == "-device"
    assert "'block-size' property has to be at least 0x100000" in str(info.value)


def test_machine_takes_the_memslot_metadata_limit() -> None:
    assert config("-m", "1G").memslot_metadata_limit is None            # MemTotal / 4
    assert config("-m", "1G", "-machine", "pc,memslot-metadata-limit=2G") \
        .memslot_metadata_limit == 2 * GiB
    assert config("-m", "1G", "-machine", "memslot-metadata-limit=0").memslot_metadata_limit == 0
    assert config("-m", "1G", "-machine", "pc,accel=kvm").memslot_metadata_limit is None
    for bad, why in (("q35", "the pc machine only"), ("pc,colour=red", "unknown key"),
                     ("pc,accel=tcg", "KVM only")):
        with pytest.raises(OptionError, match=why):
            config("-m", "1G", "-machine", bad)


@pytest.mark.kvm
def test_a_device_over_the_metadata_limit_is_refused_in_one_line() -> None:
    out = run("-m", "1G,maxmem=65G", "-machine", "memslot-metadata-limit=64M",
              "-device", "virtio-mem,id=v,size=64G,memslots=single", "-kernel", str(GUEST))
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("kvmmem run: -device: v: the device would map 64 GiB in 1 "
                                 "memslot(s), about 160.0 MiB of KVM metadata")
    assert "exceeds memslot-metadata-limit=64.0 MiB" in out.stderr


def test_sigterm_while_the_machine_is_built_ends_the_process(tmp_path: Path) -> None:
    """-serial file: on a FIFO nobody reads blocks in open() while the machine
    is built; SIGTERM then must end kvmmem run as it ends QEMU (one line,
    status 0), not leave it blocked with the signal taken and ignored."""
    fifo = tmp_path / "serial.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "kvmmem", "run", "-m", "64M",
                             "-kernel", str(GUEST), "-serial", f"file:{fifo}"],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        time.sleep(2)                           # blocked opening the FIFO
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert err.strip().splitlines() == [f"kvmmem run: terminating on signal 15 from pid {os.getpid()}"]


@pytest.mark.parametrize("kernel", ["/dev/zero", "fifo"])
def test_a_kernel_that_is_not_a_regular_file_is_refused_in_one_line(tmp_path: Path,
                                                                    kernel: str) -> None:
    """-kernel /dev/zero was read without end (a MemoryError traceback, or the
    host's memory); a FIFO blocked in open(). Both are one line, status 2.
    (The address-space limit keeps a regression from taking the host's memory.)"""
    if kernel == "fifo":
        kernel = str(tmp_path / "kernel.fifo")
        os.mkfifo(kernel)
    limit = 4 << 30
    out = subprocess.run([sys.executable, "-m", "kvmmem", "run", "-m", "64M", "-kernel", kernel],
                         capture_output=True, text=True, cwd=ROOT, timeout=60,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [f"kvmmem run: -kernel: cannot read kernel {kernel!r}: "
                                               "not a regular file"]


@pytest.mark.parametrize("size", [64 * MiB + 1, 1 << 40], ids=["ram+1", "1T-sparse"])
def test_a_kernel_larger_than_guest_ram_is_refused_before_it_is_read(tmp_path: Path,
                                                                     size: int) -> None:
    """A regular file was read whole, however large (a 1 TiB sparse file: a
    MemoryError traceback, or the host's memory). A kernel that guest RAM
    could not hold is one line naming -kernel, status 2, and is never read
    (the address-space limit makes a regression fail, not take the host's memory)."""
    kernel = tmp_path / "vmlinux"
    with open(kernel, "wb") as f:
        f.write(GUEST.read_bytes())
        f.truncate(size)
    limit = 4 << 30
    out = subprocess.run([sys.executable, "-m", "kvmmem", "run", "-m", "64M", "-kernel", str(kernel)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        (f"kvmmem run: -kernel: cannot load kernel {str(kernel)!r}: it has {size} bytes, more "
         f"than the {64 * MiB} bytes of guest RAM could hold")]


def test_an_append_that_is_not_utf8_reaches_the_guest_byte_for_byte() -> None:
    """argv is bytes; -append "\\xff" was refused with a Python codec error."""
    out = subprocess.run([sys.executable, "-m", "kvmmem", "run", "-m", "64M", "-kernel", str(GUEST),
                          "-serial", "stdio", "-append", os.fsdecode(b"kvmmem.steps=0 x=\xff")],
                         capture_output=True, cwd=ROOT, timeout=120)
    assert out.returncode == 1 and out.stderr == b"", out.stderr   # the guest's exit 0
    assert b'cmdline "console=ttyS0 kvmmem.steps=0 x=\xff"' in out.stdout, out.stdout


@pytest.mark.parametrize("obj,line", [
    ("memory-backend-ram,id=m,size=1G,bogus=1", "Property 'memory-backend-ram.bogus' not found"),
    ("memory-backend-memfd,id=m,size=1G,bogus=1",
     "Property 'memory-backend-memfd.bogus' not found"),
    ("memory-backend-ram,id=m,size=1G,seal=on", "Property 'memory-backend-ram.seal' not found"),
    ("memory-backend-ram,id=m,size=1G,hugetlb=on",
     "Property 'memory-backend-ram.hugetlb' not found"),
    ("memory-backend-ram,id=m,size=1G,share=banana", "Parameter 'share' expects 'on' or 'off'"),
    ("memory-backend-memfd,id=m,size=1G,share=banana", "Parameter 'share' expects 'on' or 'off'"),
    ("memory-backend-memfd,id=m,size=1G,seal=2", "Parameter 'seal' expects 'on' or 'off'"),
    ("memory-backend-memfd,id=m,size=1G,hugetlb=on",
     "memory-backend-memfd: hugetlb=on is not supported by kvmmem"),
    ("memory-backend-ram,id=m,size=1G,prealloc=on",
     "Property 'memory-backend-ram.prealloc' is not supported by kvmmem"),
])
def test_backend_properties_are_checked_as_qemu_checks_them(obj: str, line: str) -> None:
    # each was accepted and ignored before
    with pytest.raises(OptionError, match=f"^-object: {re.escape(line)}"):
        config("-m", "1G,maxmem=3G", "-object", obj)


def test_memfd_backends_are_shared_and_sealed_unless_told_otherwise() -> None:
    import fcntl
    cfg = config("-m", "1G,maxmem=5G", "-object", "memory-backend-memfd,id=a,size=1G",
                 "-object", "memory-backend-memfd,id=b,size=1G,seal=off",
                 "-object", "memory-backend-memfd,id=c,size=1G,share=off,hugetlb=off",
                 "-object", "memory-backend-ram,id=d,size=1G,share=on")
    try:
        kinds = {i: kind for i, (kind, _) in cfg.objects.items()}
        assert kinds == {"a": "memory-backend-memfd", "b": "memory-backend-memfd",
                         "c": "memory-backend-memfd", "d": "memory-backend-ram"}
        a, b, c, d = (cfg.objects[i][1] for i in "abcd")
        assert (a.shared, a.sealed, b.shared, b.sealed, c.shared, d.shared, d.sealed) == \
            (True, True, True, False, False, True, False)
        seals = fcntl.fcntl(a.fd, fcntl.F_GET_SEALS)
        assert seals == fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
        with pytest.raises(PermissionError):
            os.ftruncate(a.fd, 2 * GiB)                  # the seal holds
        a.discard(0, 2 * MiB)                            # hole punching still works
    finally:
        for _, host in cfg.objects.values():
            host.close()
