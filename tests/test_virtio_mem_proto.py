"""Wire format and range rules of virtio-mem (kvmmem.devices.virtio_mem_proto)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmmem.devices.virtio_mem_proto import (
    CONFIG_SIZE,
    REQUEST_SIZE,
    RESPONSE_SIZE,
    USABLE_EXTENT_X86,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_MEM,
    VIRTIO_MEM_F_ACPI_PXM,
    VIRTIO_MEM_F_PERSISTENT_SUSPEND,
    VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
    BlockState,
    Config,
    InvalidRange,
    MalformedRequest,
    MalformedResponse,
    Request,
    RequestType,
    Response,
    ResponseType,
    VirtioMemProtocolError,
    align_up,
    is_power_of_two,
    usable_region_size,
    validate_range,
)

MiB = 1 << 20
GiB = 1 << 30
u16 = st.integers(0, 0xFFFF)
u64 = st.integers(0, (1 << 64) - 1)


def le(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little")


def test_constants_match_the_spec() -> None:
    assert VIRTIO_ID_MEM == 24
    assert (VIRTIO_MEM_F_ACPI_PXM, VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE, VIRTIO_MEM_F_PERSISTENT_SUSPEND) == (0, 1, 2)
    assert VIRTIO_F_VERSION_1 == 32
    assert (REQUEST_SIZE, RESPONSE_SIZE, CONFIG_SIZE) == (24, 10, 56)
    assert [int(t) for t in (RequestType.PLUG, RequestType.UNPLUG, RequestType.UNPLUG_ALL,
                             RequestType.STATE)] == [0, 1, 2, 3]
    assert [int(t) for t in (ResponseType.ACK, ResponseType.NACK, ResponseType.BUSY,
                             ResponseType.ERROR)] == [0, 1, 2, 3]
    assert [int(s) for s in (BlockState.PLUGGED, BlockState.UNPLUGGED, BlockState.MIXED)] == [0, 1, 2]
    assert USABLE_EXTENT_X86 == 256 * MiB


@given(st.sampled_from(RequestType), u64, u16)
def test_request_pack_is_the_spec_layout(rtype: RequestType, addr: int, nb_blocks: int) -> None:
    wire = le(rtype, 2) + bytes(6) + le(addr, 8) + le(nb_blocks, 2) + bytes(6)
    assert Request(rtype, addr, nb_blocks).pack() == wire
    assert Request.parse(wire) == Request(rtype, addr, nb_blocks)


def test_request_parse_ignores_padding_and_trailing_bytes() -> None:
    wire = bytearray(Request(RequestType.UNPLUG, 0x140000000, 7).pack())
    wire[2:8] = b"\xff" * 6
    wire[18:24] = b"\xee" * 6
    parsed = Request.parse(bytes(wire) + b"extra")
    assert parsed == Request(RequestType.UNPLUG, 0x140000000, 7)
    assert isinstance(parsed.type, RequestType)


def test_request_parse_accepts_memoryview() -> None:
    wire = Request(RequestType.STATE, 4096, 3).pack()
    assert Request.parse(memoryview(bytearray(wire))) == Request(RequestType.STATE, 4096, 3)


@pytest.mark.parametrize("length", range(REQUEST_SIZE))
def test_short_request_is_malformed(length: int) -> None:
    with pytest.raises(MalformedRequest, match=f"request buffer is {length} bytes, shorter than the 24"):
        Request.parse(Request(RequestType.PLUG, 0, 1).pack()[:length])


@pytest.mark.parametrize("rtype", [4, 5, 0x100, 0xFFFF])
def test_unknown_request_type_is_malformed(rtype: int) -> None:
    wire = le(rtype, 2) + bytes(22)
    with pytest.raises(MalformedRequest, match=f"unknown virtio-mem request type {rtype}"):
        Request.parse(wire)


def test_protocol_errors_are_value_errors() -> None:
    assert issubclass(MalformedRequest, VirtioMemProtocolError)
    assert issubclass(MalformedResponse, VirtioMemProtocolError)
    assert issubclass(VirtioMemProtocolError, ValueError)
    assert issubclass(InvalidRange, ValueError)


def test_request_refuses_values_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="unknown virtio-mem request type 9"):
        Request(9, 0, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nb_blocks 0x10000 does not fit"):
        Request(RequestType.PLUG, 0, 1 << 16)
    with pytest.raises(ValueError, match="addr -0x1 does not fit"):
        Request(RequestType.PLUG, -1, 1)
    with pytest.raises(TypeError, match="addr must be an int, not float"):
        Request(RequestType.PLUG, 1.0, 1)  # type: ignore[arg-type]


@given(st.sampled_from(ResponseType), u16)
def test_response_pack_is_the_spec_layout(rtype: ResponseType, state: int) -> None:
    wire = le(rtype, 2) + bytes(6) + le(state, 2)
    assert Response(rtype, state).pack() == wire
    assert Response.parse(wire) == Response(rtype, state)


def test_response_helpers() -> None:
    assert Response.ack().pack() == bytes(10)
    assert Response.ack(BlockState.MIXED) == Response(ResponseType.ACK, 2)
    assert Response.ack(BlockState.MIXED).block_state is BlockState.MIXED
    assert Response.nack().type is ResponseType.NACK
    assert Response.busy().type is ResponseType.BUSY
    assert Response.error().pack()[:2] == le(3, 2)
    assert Response.busy().state == 0


@pytest.mark.parametrize("length", range(RESPONSE_SIZE))
def test_short_response_is_malformed(length: int) -> None:
    with pytest.raises(MalformedResponse, match=f"response buffer is {length} bytes"):
        Response.parse(Response.ack().pack()[:length])


def test_unknown_response_type_is_malformed() -> None:
    with pytest.raises(MalformedResponse, match="unknown virtio-mem response type 4"):
        Response.parse(le(4, 2) + bytes(8))
    with pytest.raises(ValueError, match="unknown virtio-mem response type 7"):
        Response(7)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="state 0x10000 does not fit"):
        Response(ResponseType.ACK, 1 << 16)


config_fields = st.builds(Config, block_size=u64, node_id=u16, addr=u64, region_size=u64,
                          usable_region_size=u64, plugged_size=u64, requested_size=u64)


@given(config_fields)
def test_config_pack_is_the_spec_layout(config: Config) -> None:
    wire = config.pack()
    assert len(wire) == 56
    assert wire[0:8] == le(config.block_size, 8)
    assert wire[8:10] == le(config.node_id, 2)
    assert wire[10:16] == bytes(6)
    assert wire[16:24] == le(config.addr, 8)
    assert wire[24:32] == le(config.region_size, 8)
    assert wire[32:40] == le(config.usable_region_size, 8)
    assert wire[40:48] == le(config.plugged_size, 8)
    assert wire[48:56] == le(config.requested_size, 8)
    assert Config.parse(wire) == config


def test_config_partial_reads() -> None:
    config = Config(block_size=2 * MiB, addr=0x140000000, region_size=500 * GiB, requested_size=2 * GiB)
    assert config.read(16, 8) == le(0x140000000, 8)
    assert config.read(48, 4) == le(2 * GiB, 8)[:4]
    assert config.read(52, 8) == le(2 * GiB, 8)[4:] + bytes(4)
    with pytest.raises(ValueError, match="negative offset or size"):
        config.read(-1, 4)


def test_config_refuses_short_buffer_and_bad_fields() -> None:
    with pytest.raises(VirtioMemProtocolError, match="config buffer is 55 bytes"):
        Config.parse(bytes(55))
    with pytest.raises(ValueError, match="node_id 0x10000 does not fit"):
        Config(block_size=2 * MiB, node_id=1 << 16)
    with pytest.raises(ValueError, match="plugged_size 0x10000000000000000 does not fit"):
        Config(block_size=2 * MiB, plugged_size=1 << 64)


def test_consistent_config_has_no_violations() -> None:
    config = Config(block_size=2 * MiB, addr=0x140000000, region_size=500 * GiB,
                    usable_region_size=2 * GiB + 256 * MiB, plugged_size=GiB, requested_size=2 * GiB)
    assert config.violations() == []


@pytest.mark.parametrize(("fields", "message"), [
    ({"block_size": 3 * MiB}, "block_size 0x300000 is not a power of two"),
    ({"addr": 0x140000000 + 4096}, "addr 0x140001000 is not a multiple of block_size"),
    ({"region_size": 500 * GiB + MiB}, "region_size .* is not a multiple of block_size"),
    ({"usable_region_size": 3 * GiB + MiB}, "usable_region_size .* is not a multiple of block_size"),
    ({"plugged_size": MiB}, "plugged_size 0x100000 is not a multiple of block_size"),
    ({"requested_size": 3 * GiB}, "usable_region_size 0x90000000 is below requested_size 0xc0000000"),
    ({"usable_region_size": 501 * GiB}, "usable_region_size .* exceeds region_size"),
    ({"plugged_size": 3 * GiB}, "plugged_size 0xc0000000 exceeds usable_region_size"),
])
def test_config_violations_name_the_broken_rule(fields: dict[str, int], message: str) -> None:
    base = {"block_size": 2 * MiB, "addr": 0x140000000, "region_size": 500 * GiB,
            "usable_region_size": 2 * GiB + 256 * MiB, "plugged_size": 0, "requested_size": 2 * GiB}
    violations = Config(**{**base, **fields}).violations()
    assert len(violations) == 1
    assert re.search(message, violations[0])


@pytest.mark.parametrize(("requested_gib", "memslots"), [(2, 3), (20, 21), (5, 6)])
def test_usable_region_of_the_seed_listings(requested_gib: int, memslots: int) -> None:
    usable = usable_region_size(500 * GiB, requested_gib * GiB, 2 * MiB)
    assert usable == requested_gib * GiB + 256 * MiB
    assert align_up(usable, GiB) // GiB == memslots


def test_usable_region_is_zero_without_request() -> None:
    assert usable_region_size(500 * GiB, 0, 2 * MiB) == 0


def test_usable_region_is_capped_at_the_region() -> None:
    assert usable_region_size(GiB, GiB - 2 * MiB, 2 * MiB) == GiB
    assert usable_region_size(GiB, GiB, 2 * MiB) == GiB


def test_usable_region_is_aligned_up_to_the_block_size() -> None:
    assert usable_region_size(8 * GiB, GiB, GiB) == 2 * GiB
    assert usable_region_size(8 * GiB, 512 * MiB, 512 * MiB) == 1 * GiB


@given(region_blocks=st.integers(1, 1 << 20), block_shift=st.integers(20, 30), data=st.data())
def test_usable_region_rules(region_blocks: int, block_shift: int, data: st.DataObject) -> None:
    block = 1 << block_shift
    region = region_blocks * block
    requested = data.draw(st.integers(0, region_blocks)) * block
    usable = usable_region_size(region, requested, block)
    assert usable % block == 0
    assert requested <= usable <= region
    if requested:
        assert usable >= min(region, requested + USABLE_EXTENT_X86)
        assert usable - block < min(region, requested + USABLE_EXTENT_X86)
    else:
        assert usable == 0


@pytest.mark.parametrize(("args", "message"), [
    ((GiB, 0, 3 * MiB), "block size 3145728 is not a power of two"),
    ((GiB + MiB, 0, 2 * MiB), "region size 0x40100000 must be a positive multiple"),
    ((0, 0, 2 * MiB), "region size 0x0 must be a positive multiple"),
    ((GiB, MiB, 2 * MiB), "requested size 0x100000 must be a multiple of the block size"),
    ((GiB, 2 * GiB, 2 * MiB), "requested size 0x80000000 exceeds the region size 0x40000000"),
])
def test_usable_region_refuses_bad_sizes(args: tuple[int, int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        usable_region_size(*args)


def test_is_power_of_two_and_align_up() -> None:
    assert [v for v in range(-2, 70) if is_power_of_two(v)] == [1, 2, 4, 8, 16, 32, 64]
    assert align_up(5, 4) == 8 and align_up(8, 4) == 8 and align_up(0, 4) == 0


BASE = 0x140000000
RANGE_RULES = {"region_addr": BASE, "usable_region_size": 4 * GiB, "block_size": 2 * MiB}


def test_validate_range_returns_the_first_block() -> None:
    assert validate_range(BASE, 1, **RANGE_RULES) == 0
    assert validate_range(BASE + 6 * MiB, 3, **RANGE_RULES) == 3
    last = BASE + 4 * GiB - 2 * MiB
    assert validate_range(last, 1, **RANGE_RULES) == 2047
    assert validate_range(BASE, 2048, **RANGE_RULES) == 0


@pytest.mark.parametrize(("addr", "nb_blocks", "message"), [
    (BASE + 4096, 1, "address 0x140001000 is not aligned to the block size 0x200000"),
    (BASE, 0, "request at 0x140000000 covers no blocks"),
    (BASE - 2 * MiB, 1, r"range \[0x13fe00000, 0x140000000\) is not inside the usable region"),
    (BASE + 4 * GiB, 1, r"range \[0x240000000, 0x240200000\) is not inside the usable region "
                        r"\[0x140000000, 0x240000000\)"),
    (BASE + 4 * GiB - 2 * MiB, 2, "is not inside the usable region"),
    (BASE, 2049, "is not inside the usable region"),
    ((1 << 64) - 2 * MiB, 2, "wraps around the address space"),
])
def test_validate_range_refusals(addr: int, nb_blocks: int, message: str) -> None:
    with pytest.raises(InvalidRange, match=message):
        validate_range(addr, nb_blocks, **RANGE_RULES)


def test_validate_range_with_empty_usable_region_refuses_everything() -> None:
    with pytest.raises(InvalidRange, match="not inside the usable region"):
        validate_range(BASE, 1, region_addr=BASE, usable_region_size=0, block_size=2 * MiB)


def test_validate_range_accepts_the_very_top_of_the_address_space() -> None:
    top = (1 << 64) - 2 * MiB
    assert validate_range(top, 1, region_addr=top, usable_region_size=2 * MiB, block_size=2 * MiB) == 0


@given(first=st.integers(-8, 80), nb_blocks=st.integers(0, 80), misalign=st.booleans())
def test_validate_range_matches_a_block_model(first: int, nb_blocks: int, misalign: bool) -> None:
    block = 2 * MiB
    usable_blocks = 64
    addr = BASE + first * block + (4096 if misalign else 0)
    inside = not misalign and nb_blocks > 0 and first >= 0 and first + nb_blocks <= usable_blocks
    if inside:
        assert validate_range(addr, nb_blocks, region_addr=BASE, usable_region_size=usable_blocks * block,
                              block_size=block) == first
    else:
        with pytest.raises(InvalidRange):
            validate_range(addr, nb_blocks, region_addr=BASE, usable_region_size=usable_blocks * block,
                           block_size=block)
