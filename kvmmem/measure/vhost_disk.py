"""A disk for vhost-user measurements and tests: a qemu-storage-daemon
exporting an image file as vhost-user-blk (optionally behind a throttle group,
so that a request stays in flight), and a host-side virtio-blk driver that
programs a transport's virtio-mmio registers and puts requests into a split
ring in guest RAM, as a guest would."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from kvmmem.memory.guest_memory import GuestMemory
from kvmmem.virtio.mmio import Reg, Status, VirtioMmioTransport

__all__ = ["QSD", "SECTOR", "VIRTIO_BLK_T_IN", "VIRTIO_BLK_T_OUT", "Backend", "HostBlkDriver",
           "is_listening", "start_backend"]

QSD = shutil.which("qemu-storage-daemon")
VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT = 0, 1
SECTOR = 512
MiB = 1 << 20


@dataclass
class Backend:
    """A running qemu-storage-daemon exporting ``image`` as vhost-user-blk on ``socket``."""

    proc: subprocess.Popen[bytes]
    socket: str
    image: Path

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def version(self) -> str:
        """``qemu-storage-daemon --version``'s first line."""
        args = self.proc.args
        assert isinstance(args, list)
        out = subprocess.run([str(args[0]), "--version"], capture_output=True, text=True,
                             check=True)
        return str(out.stdout.splitlines()[0])

    def read_image(self, offset: int, size: int) -> bytes:
        with open(self.image, "rb") as f:
            f.seek(offset)
            return f.read(size)


SO_ACCEPTCON = 1 << 16              # a listening socket's flag in /proc/net/unix


def is_listening(path: str) -> bool:
    """Whether a unix socket at ``path`` listens: the daemon binds (the file appears)
    before it listens, and a connect in between is refused (kernel's unix_seq_show)."""
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) == 8 and fields[7] == path and int(fields[3], 16) & SO_ACCEPTCON:
                return True
    return False


def start_backend(directory: Path, name: str = "disk", size: int = 64 * MiB,
                  bps: int = 0) -> Backend:
    """Start the daemon the way the README does and wait until its socket listens;
    ``bps`` > 0 puts the disk behind a throttle group of that many bytes a second,
    so that a large request stays in flight (QEMU's ``throttle`` block driver)."""
    qsd = QSD
    if qsd is None:
        raise RuntimeError("qemu-storage-daemon is not installed (Debian 12 package "
                           "qemu-system-common, with qemu-utils)")
    image = directory / f"{name}.img"
    with open(image, "wb") as f:
        f.truncate(size)
    sock = str(directory / f"{name}.sock")
    node, throttle = "f", []
    if bps:
        node = "t"
        throttle = ["--object", f"throttle-group,id=tg,x-bps-total={bps}",
                    "--blockdev", "driver=throttle,node-name=t,throttle-group=tg,file=f"]
    proc = subprocess.Popen(
        [qsd, "--blockdev", f"driver=file,node-name=f,filename={image}", *throttle,
         "--export", (f"type=vhost-user-blk,id=e,node-name={node},addr.type=unix,"
                      f"addr.path={sock},writable=on")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not is_listening(sock):
        if proc.poll() is not None:
            assert proc.stderr is not None
            raise RuntimeError(f"qemu-storage-daemon exited: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("qemu-storage-daemon did not listen on its socket")
        time.sleep(0.02)
    return Backend(proc, sock, image)


class HostBlkDriver:
    """A virtio-blk driver running on the host against a transport's registers.

    The ring (size 8) and the request headers live at ``ring_gpa`` in guest
    RAM; data buffers are wherever the caller puts them (a plugged block, say).
    """

    QUEUE = 8

    def __init__(self, transport: VirtioMmioTransport, memory: GuestMemory, ring_gpa: int) -> None:
        self.t, self.mem = transport, memory
        self.desc = ring_gpa
        self.avail = ring_gpa + 16 * self.QUEUE
        self.used = ring_gpa + 0x1000
        self.headers = ring_gpa + 0x2000
        self.avail_idx = 0
        self.used_seen = 0

    def reg(self, reg: Reg, value: int | None = None) -> int:
        if value is None:
            return self.t.read(int(reg), 4)
        self.t.write(int(reg), 4, value)
        return value

    def setup(self, features: int | None = None) -> int:
        """The virtio handshake; returns the features the device offered."""
        self.reg(Reg.STATUS, 0)
        self.reg(Reg.STATUS, Status.ACKNOWLEDGE | Status.DRIVER)
        offered = 0
        for sel in (0, 1):
            self.reg(Reg.DEVICE_FEATURES_SEL, sel)
            offered |= self.reg(Reg.DEVICE_FEATURES) << (32 * sel)
        accept = offered & (1 << 32) if features is None else features
        for sel in (0, 1):
            self.reg(Reg.DRIVER_FEATURES_SEL, sel)
            self.reg(Reg.DRIVER_FEATURES, (accept >> (32 * sel)) & 0xFFFFFFFF)
        self.reg(Reg.STATUS, Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        assert self.reg(Reg.STATUS) & Status.FEATURES_OK
        self.mem.write(self.desc, bytes(0x2000 + 0x100))
        self.reg(Reg.QUEUE_SEL, 0)
        self.reg(Reg.QUEUE_NUM, self.QUEUE)
        for low, value in ((Reg.QUEUE_DESC_LOW, self.desc), (Reg.QUEUE_DRIVER_LOW, self.avail),
                           (Reg.QUEUE_DEVICE_LOW, self.used)):
            self.reg(low, value & 0xFFFFFFFF)
            self.reg(Reg(low + 4), value >> 32)
        self.reg(Reg.QUEUE_READY, 1)
        self.reg(Reg.STATUS, Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK
                 | Status.DRIVER_OK)
        return offered

    def submit(self, kind: int, sector: int, buf_gpa: int, length: int,
               timeout: float = 20.0) -> int:
        """One request of three descriptors; returns the status byte the back-end wrote."""
        return self.finish(self.begin(kind, sector, buf_gpa, length), timeout)

    def begin(self, kind: int, sector: int, buf_gpa: int, length: int) -> int:
        """Make one request available and kick; returns its ticket for :meth:`finish`.
        At most two may be in flight (descriptors 0-2 and 3-5)."""
        slot = self.avail_idx % self.QUEUE
        hdr = self.headers + slot * 32
        status = hdr + 16
        self.mem.write(hdr, struct.pack("<IIQ", kind, 0, sector))
        self.mem.write(status, b"\xee")
        head = 3 * (self.avail_idx % 2)
        data_flags = 1 | (2 if kind == VIRTIO_BLK_T_IN else 0)
        self.mem.write(self.desc + 16 * head, struct.pack("<QIHH", hdr, 16, 1, head + 1))
        self.mem.write(self.desc + 16 * (head + 1),
                       struct.pack("<QIHH", buf_gpa, length, data_flags, head + 2))
        self.mem.write(self.desc + 16 * (head + 2), struct.pack("<QIHH", status, 1, 2, 0))
        self.mem.write(self.avail + 4 + 2 * slot, struct.pack("<H", head))
        self.avail_idx += 1
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx & 0xFFFF))
        fd = self.t.notify_fd
        assert fd is not None
        os.eventfd_write(fd, 1)        # what KVM does on the guest's QueueNotify write
        return self.avail_idx

    def used_idx(self) -> int:
        return int(struct.unpack("<H", self.mem.read(self.used + 2, 2))[0])

    def done(self, ticket: int) -> bool:
        """Whether the request behind ``ticket`` (and every earlier one) completed."""
        return (self.used_idx() - ticket) & 0xFFFF < 0x8000

    def finish(self, ticket: int, timeout: float = 20.0) -> int:
        """Wait for the request behind ``ticket``; its status byte."""
        deadline = time.monotonic() + timeout
        while not self.done(ticket):
            if time.monotonic() > deadline:
                raise TimeoutError("the back-end did not complete the request")
            time.sleep(0.001)
        return self.mem.read(self.headers + (ticket - 1) % self.QUEUE * 32 + 16, 1)[0]
