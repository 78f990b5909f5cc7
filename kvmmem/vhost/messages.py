"""vhost-user wire format: request numbers, flags, feature bits and payloads.

Follows QEMU's ``docs/interop/vhost-user.rst`` ("Message Specification",
"Protocol features", "Front-end message types"). A message is a 12-byte
header (request u32, flags u32, payload size u32, native byte order, which
is little-endian on x86-64) and a payload; file descriptors travel beside it
as ``SCM_RIGHTS`` ancillary data. Pure packing and unpacking, no I/O.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

__all__ = [
    "FLAG_NEED_REPLY",
    "FLAG_REPLY",
    "F_PROTOCOL_FEATURES",
    "HEADER",
    "MEMORY_BASELINE_NREGIONS",
    "VERSION",
    "VRING_INVALID_FD",
    "Header",
    "MemoryRegionDesc",
    "ProtocolFeature",
    "Request",
    "VhostUserProtocolError",
    "VringAddr",
    "pack_config",
    "pack_memory_table",
    "pack_u64",
    "pack_vring_state",
    "unpack_config",
    "unpack_u64",
    "unpack_vring_state",
]

HEADER = struct.Struct("<III")
VERSION = 0x1                     # flags bits 0-1
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
F_PROTOCOL_FEATURES = 30          # VHOST_USER_F_PROTOCOL_FEATURES, a virtio feature bit
MEMORY_BASELINE_NREGIONS = 8      # SET_MEM_TABLE carries at most 8 regions
VRING_INVALID_FD = 1 << 8         # SET_VRING_KICK/CALL: no fd, poll instead
MAX_PAYLOAD = 4096                # the largest payload this front-end accepts in a reply

_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")
_REGION = struct.Struct("<QQQQ")           # guest address, size, user address, mmap offset
_VRING_ADDR = struct.Struct("<IIQQQQ")      # index, flags, desc, used, avail, log
_CONFIG_HDR = struct.Struct("<III")         # offset, size, flags


class VhostUserProtocolError(Exception):
    """A message that does not follow the vhost-user format."""


class Request(enum.IntEnum):
    """Front-end request numbers (``VHOST_USER_*``)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    GET_CONFIG = 24
    SET_CONFIG = 25
    RESET_DEVICE = 34
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38


class ProtocolFeature(enum.IntEnum):
    """``VHOST_USER_PROTOCOL_F_*`` bit numbers."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


@dataclass(frozen=True)
class Header:
    request: int
    flags: int
    size: int

    def pack(self) -> bytes:
        return HEADER.pack(self.request, self.flags, self.size)

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        if len(data) != HEADER.size:
            raise VhostUserProtocolError(f"a header is {HEADER.size} bytes, got {len(data)}")
        header = cls(*HEADER.unpack(data))
        if header.flags & 0x3 != VERSION:
            raise VhostUserProtocolError(f"message version {header.flags & 0x3}, expected {VERSION}")
        if header.size > MAX_PAYLOAD:
            raise VhostUserProtocolError(f"payload of {header.size} bytes is larger than "
                                         f"{MAX_PAYLOAD}")
        return header


@dataclass(frozen=True, order=True)
class MemoryRegionDesc:
    """One guest memory region as the back-end maps it: ``size`` bytes of the
    fd from ``mmap_offset``, at guest address ``guest_phys_addr`` and at the
    front-end's virtual address ``userspace_addr``."""

    guest_phys_addr: int
    size: int
    userspace_addr: int
    mmap_offset: int

    def pack(self) -> bytes:
        return _REGION.pack(self.guest_phys_addr, self.size, self.userspace_addr, self.mmap_offset)

    def pack_single(self) -> bytes:
        """ADD_MEM_REG / REM_MEM_REG payload: 64 bits of padding, then the region."""
        return _U64.pack(0) + self.pack()

    @classmethod
    def unpack_single(cls, data: bytes) -> MemoryRegionDesc:
        if len(data) < _U64.size + _REGION.size:
            raise VhostUserProtocolError(f"a single memory region is {_U64.size + _REGION.size} "
                                         f"bytes, got {len(data)}")
        return cls(*_REGION.unpack_from(data, _U64.size))


@dataclass(frozen=True)
class VringAddr:
    """SET_VRING_ADDR: ring addresses as the front-end's virtual addresses."""

    index: int
    desc: int
    used: int
    avail: int
    flags: int = 0
    log: int = 0

    def pack(self) -> bytes:
        return _VRING_ADDR.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)


def pack_u64(value: int) -> bytes:
    return _U64.pack(value)


def unpack_u64(data: bytes) -> int:
    if len(data) != _U64.size:
        raise VhostUserProtocolError(f"a u64 payload is 8 bytes, got {len(data)}")
    value: int = _U64.unpack(data)[0]
    return value


def pack_vring_state(index: int, num: int) -> bytes:
    return _STATE.pack(index, num)


def unpack_vring_state(data: bytes) -> tuple[int, int]:
    if len(data) != _STATE.size:
        raise VhostUserProtocolError(f"a vring state is 8 bytes, got {len(data)}")
    index, num = _STATE.unpack(data)
    return index, num


def pack_memory_table(regions: list[MemoryRegionDesc]) -> bytes:
    """SET_MEM_TABLE payload: count, padding, then the regions."""
    if len(regions) > MEMORY_BASELINE_NREGIONS:
        raise VhostUserProtocolError(f"SET_MEM_TABLE carries at most {MEMORY_BASELINE_NREGIONS} "
                                     f"regions, not {len(regions)}")
    return _STATE.pack(len(regions), 0) + b"".join(r.pack() for r in regions)


def pack_config(offset: int, data: bytes, flags: int = 0) -> bytes:
    """GET_CONFIG / SET_CONFIG payload: offset, size, flags, then the bytes."""
    return _CONFIG_HDR.pack(offset, len(data), flags) + data


def unpack_config(payload: bytes) -> tuple[int, bytes]:
    """(offset, bytes) of a GET_CONFIG reply; a zero size is the back-end's error."""
    if len(payload) < _CONFIG_HDR.size:
        raise VhostUserProtocolError(f"a config payload is at least {_CONFIG_HDR.size} bytes")
    offset, size, _ = _CONFIG_HDR.unpack_from(payload)
    data = payload[_CONFIG_HDR.size:]
    if size != len(data):
        raise VhostUserProtocolError(f"config payload says {size} bytes but carries {len(data)}")
    return offset, data
