"""The vhost-user wire format (QEMU's docs/interop/vhost-user.rst), byte for byte."""

from __future__ import annotations

import struct

import pytest

from kvmmem.vhost.messages import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    Header,
    MemoryRegionDesc,
    Request,
    VhostUserProtocolError,
    VringAddr,
    pack_config,
    pack_memory_table,
    pack_u64,
    pack_vring_state,
    unpack_config,
    unpack_u64,
    unpack_vring_state,
)


def test_request_numbers_follow_the_specification() -> None:
    assert (Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.SET_PROTOCOL_FEATURES,
            Request.GET_MAX_MEM_SLOTS, Request.ADD_MEM_REG, Request.REM_MEM_REG) == \
        (1, 15, 16, 36, 37, 38)


def test_header_is_three_native_u32() -> None:
    raw = Header(Request.ADD_MEM_REG, 1 | FLAG_NEED_REPLY, 40).pack()
    assert raw == struct.pack("<III", 37, 9, 40)
    assert Header.unpack(struct.pack("<III", 1, 1 | FLAG_REPLY, 8)) == Header(1, 5, 8)
    with pytest.raises(VhostUserProtocolError, match="version"):
        Header.unpack(struct.pack("<III", 1, 2 | FLAG_REPLY, 8))
    with pytest.raises(VhostUserProtocolError, match="larger"):
        Header.unpack(struct.pack("<III", 1, 1, 1 << 20))
    with pytest.raises(VhostUserProtocolError):
        Header.unpack(b"\x00" * 11)


def test_single_region_has_64_bits_of_padding_first() -> None:
    region = MemoryRegionDesc(0x1_4000_0000, 1 << 30, 0x7F00_0000_0000, 0x4000_0000)
    raw = region.pack_single()
    assert raw == struct.pack("<QQQQQ", 0, 0x1_4000_0000, 1 << 30, 0x7F00_0000_0000, 0x4000_0000)
    assert MemoryRegionDesc.unpack_single(raw) == region
    with pytest.raises(VhostUserProtocolError):
        MemoryRegionDesc.unpack_single(raw[:39])


def test_memory_table_carries_at_most_eight_regions() -> None:
    regions = [MemoryRegionDesc(i << 30, 1 << 30, 0x1000 * i, 0) for i in range(8)]
    raw = pack_memory_table(regions)
    assert len(raw) == 8 + 8 * 32 and struct.unpack_from("<II", raw) == (8, 0)
    with pytest.raises(VhostUserProtocolError, match="at most 8"):
        pack_memory_table(regions + regions[:1])


def test_vring_payloads() -> None:
    assert pack_vring_state(0, 128) == struct.pack("<II", 0, 128)
    assert unpack_vring_state(struct.pack("<II", 1, 7)) == (1, 7)
    assert VringAddr(0, desc=1, used=2, avail=3).pack() == struct.pack("<IIQQQQ", 0, 0, 1, 2, 3, 0)
    assert unpack_u64(pack_u64(1 << 40)) == 1 << 40
    with pytest.raises(VhostUserProtocolError):
        unpack_u64(b"\x00" * 4)


def test_config_payload_and_its_error_form() -> None:
    raw = pack_config(0, bytes(range(60)))
    assert raw[:12] == struct.pack("<III", 0, 60, 0)
    assert unpack_config(raw) == (0, bytes(range(60)))
    with pytest.raises(VhostUserProtocolError, match="carries"):
        unpack_config(struct.pack("<III", 0, 60, 0) + b"\x00" * 10)
