"""virtio-mem wire format: constants, request/response/config layouts and range rules.

Pure data handling, no device state: the device (``virtio_mem.py``) decides what
to answer, this module only says what the bytes mean (VIRTIO 1.2, "Memory Device").
All fields are little-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

VIRTIO_ID_MEM = 24

VIRTIO_MEM_F_ACPI_PXM = 0
VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE = 1
VIRTIO_MEM_F_PERSISTENT_SUSPEND = 2
VIRTIO_F_VERSION_1 = 32

MiB = 1 << 20
GiB = 1 << 30
U16_MAX = (1 << 16) - 1
U64_MAX = (1 << 64) - 1

# On x86 Linux only plugs whole 128 MiB memory blocks lying fully inside the
# usable region; two of them of slack let it use all of requested_size.
USABLE_EXTENT_X86 = 256 * MiB

# type, 3 x pad, addr, nb_blocks, 3 x pad
_REQUEST = struct.Struct("<H6xQH6x")
# type, 3 x pad, state
_RESPONSE = struct.Struct("<H6xH")
# block_size, node_id, 6 pad, addr, region_size, usable, plugged, requested
_CONFIG = struct.Struct("<QH6xQQQQQ")

REQUEST_SIZE = _REQUEST.size
RESPONSE_SIZE = _RESPONSE.size
CONFIG_SIZE = _CONFIG.size


class RequestType(IntEnum):
    """What the driver asks for."""

    PLUG = 0
    UNPLUG = 1
    UNPLUG_ALL = 2
    STATE = 3


# Wire value -> RequestType without an enum call per request.
_REQUEST_TYPES = {t.value: t for t in RequestType}


class ResponseType(IntEnum):
    """How the device answers."""

    ACK = 0
    NACK = 1
    BUSY = 2
    ERROR = 3


class BlockState(IntEnum):
    """Answer to a STATE request: the state of every block in the range."""

    PLUGGED = 0
    UNPLUGGED = 1
    MIXED = 2


class VirtioMemProtocolError(ValueError):
    """Bytes that do not form a valid virtio-mem message."""


class MalformedRequest(VirtioMemProtocolError):
    """A request the device cannot parse: it sets DEVICE_NEEDS_RESET instead of answering."""


class MalformedResponse(VirtioMemProtocolError):
    """A response that cannot be parsed (driver side and tests)."""


class InvalidRange(ValueError):
    """A request range that breaks check 1 of the request rules: the answer is ERROR."""


def is_power_of_two(value: int) -> bool:
    """True for 1, 2, 4, ...; False for 0 and negatives."""
    return value > 0 and value & (value - 1) == 0


def align_up(value: int, alignment: int) -> int:
    """Round ``value`` up to a multiple of ``alignment`` (any positive alignment)."""
    return -(-value // alignment) * alignment


def _check_uint(name: str, value: int, maximum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise ValueError(f"{name} {value:#x} does not fit the field (0..{maximum:#x})")


def _check_length(buf: bytes | bytearray | memoryview, need: int, what: str,
                  error: type[VirtioMemProtocolError]) -> None:
    if len(buf) < need:
        raise error(f"{what} buffer is {len(buf)} bytes, shorter than the {need} bytes of the format")


@dataclass(frozen=True)
class Request:
    """One guest request; ``addr`` and ``nb_blocks`` are 0 for UNPLUG_ALL."""

    type: RequestType
    addr: int = 0
    nb_blocks: int = 0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "type", RequestType(self.type))
        except ValueError:
            raise ValueError(f"unknown virtio-mem request type {self.type!r}") from None
        _check_uint("addr", self.addr, U64_MAX)
        _check_uint("nb_blocks", self.nb_blocks, U16_MAX)

    @classmethod
    def parse(cls, buf: bytes | bytearray | memoryview) -> Request:
        """Decode the first 24 bytes of ``buf``; extra bytes are ignored.

        Raises MalformedRequest for a short buffer or an unknown type.
        """
        _check_length(buf, REQUEST_SIZE, "request", MalformedRequest)
        raw_type, addr, nb_blocks = _REQUEST.unpack_from(buf)
        rtype = _REQUEST_TYPES.get(raw_type)
        if rtype is None:
            raise MalformedRequest(f"unknown virtio-mem request type {raw_type}")
        # The field widths of the format bound addr and nb_blocks: the checks
        # of __post_init__ (for requests built in Python) cannot fail here.
        req = object.__new__(cls)
        object.__setattr__(req, "type", rtype)
        object.__setattr__(req, "addr", addr)
        object.__setattr__(req, "nb_blocks", nb_blocks)
        return req

    def pack(self) -> bytes:
        """Encode as the 24-byte wire format, padding zeroed."""
        return _REQUEST.pack(self.type, self.addr, self.nb_blocks)


@dataclass(frozen=True)
class Response:
    """The device's answer; ``state`` only means something for an ACK to STATE."""

    type: ResponseType
    state: int = 0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "type", ResponseType(self.type))
        except ValueError:
            raise ValueError(f"unknown virtio-mem response type {self.type!r}") from None
        _check_uint("state", self.state, U16_MAX)

    # The answers without a state are immutable: one shared instance each
    # (filled in below the class) spares building one per request.

    @classmethod
    def ack(cls, state: BlockState | None = None) -> Response:
        """ACK; pass ``state`` when answering STATE."""
        return _ACK if state is None else cls(ResponseType.ACK, BlockState(state))

    @classmethod
    def nack(cls) -> Response:
        return _NACK

    @classmethod
    def busy(cls) -> Response:
        return _BUSY

    @classmethod
    def error(cls) -> Response:
        return _ERROR

    @property
    def block_state(self) -> BlockState:
        """``state`` as a BlockState; ValueError if it is not one."""
        return BlockState(self.state)

    @classmethod
    def parse(cls, buf: bytes | bytearray | memoryview) -> Response:
        """Decode the first 10 bytes of ``buf``; MalformedResponse if short or of unknown type."""
        _check_length(buf, RESPONSE_SIZE, "response", MalformedResponse)
        rtype, state = _RESPONSE.unpack_from(buf)
        try:
            return cls(ResponseType(rtype), state)
        except ValueError:
            raise MalformedResponse(f"unknown virtio-mem response type {rtype}") from None

    def pack(self) -> bytes:
        """Encode as the 10-byte wire format, padding zeroed."""
        return _RESPONSE.pack(self.type, self.state)


_ACK, _NACK, _BUSY, _ERROR = (Response(t) for t in (ResponseType.ACK, ResponseType.NACK,
                                                     ResponseType.BUSY, ResponseType.ERROR))


@dataclass(frozen=True)
class Config:
    """The device's 56-byte config space (read-only for the driver)."""

    block_size: int
    node_id: int = 0
    addr: int = 0
    region_size: int = 0
    usable_region_size: int = 0
    plugged_size: int = 0
    requested_size: int = 0

    def __post_init__(self) -> None:
        for name in ("block_size", "addr", "region_size", "usable_region_size",
                     "plugged_size", "requested_size"):
            _check_uint(name, getattr(self, name), U64_MAX)
        _check_uint("node_id", self.node_id, U16_MAX)

    @classmethod
    def parse(cls, buf: bytes | bytearray | memoryview) -> Config:
        """Decode the first 56 bytes of ``buf``."""
        _check_length(buf, CONFIG_SIZE, "config", VirtioMemProtocolError)
        bs, node, addr, region, usable, plugged, requested = _CONFIG.unpack_from(buf)
        return cls(bs, node, addr, region, usable, plugged, requested)

    def pack(self) -> bytes:
        """Encode as the 56-byte config layout, padding zeroed."""
        return _CONFIG.pack(self.block_size, self.node_id, self.addr, self.region_size,
                            self.usable_region_size, self.plugged_size, self.requested_size)

    def read(self, offset: int, size: int) -> bytes:
        """The bytes a driver config read of ``size`` at ``offset`` sees (zeros past the end)."""
        if offset < 0 or size < 0:
            raise ValueError(f"config read at {offset} of {size} bytes: negative offset or size")
        data = self.pack()[offset:offset + size]
        return data + bytes(size - len(data))

    def violations(self) -> list[str]:
        """The device rules this config breaks (empty when it is consistent)."""
        found: list[str] = []
        bs = self.block_size
        if not is_power_of_two(bs):
            found.append(f"block_size {bs:#x} is not a power of two")
            return found
        for name in ("addr", "region_size", "usable_region_size", "plugged_size", "requested_size"):
            value = getattr(self, name)
            if value % bs:
                found.append(f"{name} {value:#x} is not a multiple of block_size {bs:#x}")
        if self.usable_region_size < self.requested_size:
            found.append(f"usable_region_size {self.usable_region_size:#x} is below "
                         f"requested_size {self.requested_size:#x}")
        if self.usable_region_size > self.region_size:
            found.append(f"usable_region_size {self.usable_region_size:#x} exceeds "
                         f"region_size {self.region_size:#x}")
        if self.plugged_size > self.usable_region_size:
            found.append(f"plugged_size {self.plugged_size:#x} exceeds "
                         f"usable_region_size {self.usable_region_size:#x}")
        return found


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or not is_power_of_two(block_size):
        raise ValueError(f"block size {block_size!r} is not a power of two")


def usable_region_size(region_size: int, requested_size: int, block_size: int,
                       extent: int = USABLE_EXTENT_X86) -> int:
    """The usable region for ``requested_size``: requested plus ``extent``, capped at the region.

    0 when nothing is requested. This is the target value only: the device
    keeps the usable region from shrinking except on UNPLUG_ALL or system reset.
    """
    _check_block_size(block_size)
    if region_size <= 0 or region_size % block_size:
        raise ValueError(f"region size {region_size:#x} must be a positive multiple "
                         f"of the block size {block_size:#x}")
    if requested_size < 0 or requested_size % block_size:
        raise ValueError(f"requested size {requested_size:#x} must be a multiple "
                         f"of the block size {block_size:#x}")
    if requested_size > region_size:
        raise ValueError(f"requested size {requested_size:#x} exceeds the region size {region_size:#x}")
    if extent < 0:
        raise ValueError(f"extent {extent:#x} is negative")
    if requested_size == 0:
        return 0
    return align_up(min(region_size, requested_size + extent), block_size)


def validate_range(addr: int, nb_blocks: int, *, region_addr: int,
                   usable_region_size: int, block_size: int) -> int:
    """Check 1 of the request rules; return the index of the first block of the range.

    Raises InvalidRange (the device answers ERROR) when ``addr`` is not
    block-aligned, ``nb_blocks`` is 0, the range wraps around 2**64, or it is
    not fully inside ``[region_addr, region_addr + usable_region_size)``.
    """
    if type(block_size) is not int or block_size <= 0 or block_size & (block_size - 1):
        _check_block_size(block_size)
    if addr % block_size:
        raise InvalidRange(f"address {addr:#x} is not aligned to the block size {block_size:#x}")
    if nb_blocks <= 0:
        raise InvalidRange(f"request at {addr:#x} covers no blocks")
    size = nb_blocks * block_size
    if addr + size - 1 > U64_MAX:
        raise InvalidRange(f"range at {addr:#x} of {size:#x} bytes wraps around the address space")
    usable_end = region_addr + usable_region_size
    if addr < region_addr or addr + size > usable_end:
        raise InvalidRange(f"range [{addr:#x}, {addr + size:#x}) is not inside the usable "
                           f"region [{region_addr:#x}, {usable_end:#x})")
    return (addr - region_addr) // block_size
