"""The virtio-mmio version 2 register layout (VIRTIO 1.2, section 4.2.2):
offsets, status bits, which registers are read- or write-only, and the
per-queue state the driver programs through them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kvmmem.virtio.queue import SplitQueue

__all__ = ["Reg", "Status", "QueueState", "MAGIC_VALUE", "VERSION", "VENDOR_ID", "MMIO_SIZE",
           "CONFIG_OFFSET", "INT_USED_BUFFER", "INT_CONFIG_CHANGE", "READ_ONLY", "WRITE_ONLY",
           "QUEUE_ADDRESS"]

MAGIC_VALUE = 0x74726976      # "virt", little-endian
VERSION = 2                   # non-legacy virtio-mmio
VENDOR_ID = 0x554D4551        # "QEMU", what Linux guests are used to seeing
MMIO_SIZE = 0x200
CONFIG_OFFSET = 0x100

INT_USED_BUFFER = 1
INT_CONFIG_CHANGE = 2

class Reg(enum.IntEnum):
    """Control register offsets (all 32 bits wide)."""

    MAGIC_VALUE = 0x000
    VERSION = 0x004
    DEVICE_ID = 0x008
    VENDOR_ID = 0x00C
    DEVICE_FEATURES = 0x010
    DEVICE_FEATURES_SEL = 0x014
    DRIVER_FEATURES = 0x020
    DRIVER_FEATURES_SEL = 0x024
    QUEUE_SEL = 0x030
    QUEUE_NUM_MAX = 0x034
    QUEUE_NUM = 0x038
    QUEUE_READY = 0x044
    QUEUE_NOTIFY = 0x050
    INTERRUPT_STATUS = 0x060
    INTERRUPT_ACK = 0x064
    STATUS = 0x070
    QUEUE_DESC_LOW = 0x080
    QUEUE_DESC_HIGH = 0x084
    QUEUE_DRIVER_LOW = 0x090
    QUEUE_DRIVER_HIGH = 0x094
    QUEUE_DEVICE_LOW = 0x0A0
    QUEUE_DEVICE_HIGH = 0x0A4
    SHM_SEL = 0x0AC
    SHM_LEN_LOW = 0x0B0
    SHM_LEN_HIGH = 0x0B4
    SHM_BASE_LOW = 0x0B8
    SHM_BASE_HIGH = 0x0BC
    QUEUE_RESET = 0x0C0
    CONFIG_GENERATION = 0x0FC


class Status(enum.IntFlag):
    """Device status bits (VIRTIO 1.2, section 2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 0x40
    FAILED = 0x80


WRITE_ONLY = frozenset({
    Reg.DEVICE_FEATURES_SEL, Reg.DRIVER_FEATURES, Reg.DRIVER_FEATURES_SEL, Reg.QUEUE_SEL,
    Reg.QUEUE_NUM, Reg.QUEUE_NOTIFY, Reg.INTERRUPT_ACK, Reg.QUEUE_DESC_LOW,
    Reg.QUEUE_DESC_HIGH, Reg.QUEUE_DRIVER_LOW, Reg.QUEUE_DRIVER_HIGH, Reg.QUEUE_DEVICE_LOW,
    Reg.QUEUE_DEVICE_HIGH, Reg.SHM_SEL,
})
READ_ONLY = frozenset({
    Reg.MAGIC_VALUE, Reg.VERSION, Reg.DEVICE_ID, Reg.VENDOR_ID, Reg.DEVICE_FEATURES,
    Reg.QUEUE_NUM_MAX, Reg.INTERRUPT_STATUS, Reg.SHM_LEN_LOW, Reg.SHM_LEN_HIGH,
    Reg.SHM_BASE_LOW, Reg.SHM_BASE_HIGH, Reg.CONFIG_GENERATION,
})
QUEUE_ADDRESS = {
    Reg.QUEUE_DESC_LOW: ("desc", 0), Reg.QUEUE_DESC_HIGH: ("desc", 32),
    Reg.QUEUE_DRIVER_LOW: ("driver", 0), Reg.QUEUE_DRIVER_HIGH: ("driver", 32),
    Reg.QUEUE_DEVICE_LOW: ("device", 0), Reg.QUEUE_DEVICE_HIGH: ("device", 32),
}


@dataclass
class QueueState:
    """The driver-programmed registers of one virtqueue and, once it is
    ready, the live :class:`SplitQueue` (``ring``)."""

    max_size: int
    num: int = field(init=False)         # QueueNum; the maximum until the driver writes it
    desc: int = 0
    driver: int = 0
    device: int = 0
    ring: SplitQueue | None = None

    def __post_init__(self) -> None:
        self.num = self.max_size

    @property
    def ready(self) -> bool:
        return self.ring is not None

    def reset(self) -> None:
        self.num, self.desc, self.driver, self.device, self.ring = self.max_size, 0, 0, 0, None
