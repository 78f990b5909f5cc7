"""A host-side stand-in for the guest's virtio-mem driver.

It sends the requests Linux's driver would send to follow
``requested_size`` (UNPLUG_ALL first when something is plugged at start,
then PLUG or UNPLUG in 128 MiB steps inside the usable region, retry on
NACK, stop on ERROR), straight into :meth:`VirtioMem.process`. Demos and
benchmarks use it to exercise the device without booting a guest; the
test guest under ``tests/guest`` does the same from inside a VM.
"""

from __future__ import annotations

from kvmmem.devices.plug_bitmap import PlugBitmap
from kvmmem.devices.virtio_mem import VirtioMem
from kvmmem.devices.virtio_mem_proto import Request, RequestType, ResponseType

STEP = 128 << 20          # Linux plugs and unplugs whole 128 MiB memory blocks


class DriverError(RuntimeError):
    """The device answered ERROR or stayed BUSY: a real driver would give up."""


class HostDriver:
    """Follows a device's requested size with whole requests, like Linux."""

    def __init__(self, dev: VirtioMem) -> None:
        self.dev = dev
        self.requests = 0
        self._probed = False

    def sync(self) -> int:
        """Plug or unplug until ``plugged_size == requested_size``; return it."""
        dev = self.dev
        if not self._probed:
            self._probed = True
            if dev.plugged_size:
                self._send(RequestType.UNPLUG_ALL, 0, 0)
        per_step = max(STEP // dev.block_size, 1)
        while dev.plugged_size != dev.requested_size:
            bits = self._bits()
            wanted = abs(dev.requested_size - dev.plugged_size) // dev.block_size
            if dev.plugged_size < dev.requested_size:
                first = bits.find(False, 0, dev.usable_region_size // dev.block_size)
                if first < 0:
                    raise DriverError(f"{dev.id}: the usable region has no unplugged block")
                end = min((first // per_step + 1) * per_step, first + wanted,
                          dev.usable_region_size // dev.block_size)
                stop = bits.find(True, first, end)
                self._send(RequestType.PLUG, first, (end if stop < 0 else stop) - first)
            else:
                last = bits.rfind(True)
                start = max(last // per_step * per_step, last + 1 - wanted)
                gap = bits.rfind(False, start, last + 1)
                first = start if gap < 0 else gap + 1
                self._send(RequestType.UNPLUG, first, last + 1 - first)
        return dev.plugged_size

    def reboot(self) -> None:
        """The guest restarts: its driver will probe the device again."""
        self._probed = False

    def _bits(self) -> PlugBitmap:
        assert self.dev.bitmap is not None, "the device is not plugged into a machine"
        return self.dev.bitmap

    def _send(self, kind: RequestType, first_block: int, nb_blocks: int) -> None:
        addr = self.dev.addr + first_block * self.dev.block_size
        for _ in range(3):
            self.requests += 1
            answer = self.dev.process(Request(kind, addr, nb_blocks))
            if answer.type in (ResponseType.ACK, ResponseType.NACK):
                return
            if answer.type is ResponseType.ERROR:
                raise DriverError(f"{self.dev.id}: {kind.name} of {nb_blocks} blocks at "
                                  f"{addr:#x} answered ERROR")
        raise DriverError(f"{self.dev.id}: {kind.name} at {addr:#x} stayed BUSY")
