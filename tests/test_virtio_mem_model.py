"""Random request streams against a small reference model of the spec.

After every step: the answer, ``plugged_size``, the bitmap, the memslots KVM
holds, and (with ``protect=block``) which blocks are guarded on the host.
In ``exact`` mode the memslots must cover exactly the plugged blocks, each
run cut into maximal aligned chunks of 128 MiB, 1 GiB or 8 GiB, except in
the grid memslots the device mapped whole because its budget of 8 memslots
would not hold the chunks. With a ``merge-delay`` (deferred merges) the
chunks may be smaller than maximal until a ``merge`` step runs the merges:
after every step they are still aligned, fully plugged and within the
budget, and with no merge pending they are the maximal ones.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmem_helpers import GiB, MiB, expected_ranges, kvm_ranges, plug_device, small_machine

from kvmmem.devices.virtio_mem_proto import BlockState, Request, RequestType, Response
from kvmmem.kvm import Kvm

pytestmark = pytest.mark.kvm

BLOCK = 128 * MiB
REGION = 8 * GiB
NB = REGION // BLOCK            # 64 blocks
PER_SLOT = GiB // BLOCK         # 8 blocks per 1 GiB memslot
EXTENT = 256 * MiB


class Model:
    """What the device must do (VIRTIO 1.2, 5.15.6.2; QEMU's virtio-mem.c)."""

    def __init__(self, mode: str, base: int) -> None:
        self.mode, self.base = mode, base
        self.requested, self.usable, self.plugged = 0, 0, set()

    def target(self) -> int:
        return 0 if not self.requested else min(REGION, self.requested + EXTENT)

    def process(self, kind: RequestType, addr: int, n: int) -> Response:
        if kind is RequestType.UNPLUG_ALL:
            self.plugged.clear()
            self.usable = self.target()
            return Response.ack()
        end = addr + n * BLOCK
        if addr % BLOCK or n == 0 or end - 1 >= 1 << 64 or addr < self.base \
                or end > self.base + self.usable:
            return Response.error()
        blocks = set(range((addr - self.base) // BLOCK, (end - self.base) // BLOCK))
        if kind is RequestType.STATE:
            inside = len(blocks & self.plugged)
            return Response.ack(BlockState.PLUGGED if inside == n else
                                BlockState.UNPLUGGED if inside == 0 else BlockState.MIXED)
        if kind is RequestType.PLUG:
            if (len(self.plugged) + n) * BLOCK > self.requested:
                return Response.nack()
            if blocks & self.plugged:
                return Response.error()
            self.plugged |= blocks
        else:
            if blocks - self.plugged:
                return Response.error()
            self.plugged -= blocks
        return Response.ack()

    def resize(self, size: int) -> None:
        self.requested = size
        self.usable = max(self.usable, self.target())

    def reset(self) -> None:
        self.plugged.clear()
        self.usable = self.target()

    def mapped(self) -> set[int]:
        if self.mode in ("dynamic", "exact"):
            return {b // PER_SLOT for b in self.plugged}
        if self.mode == "usable":
            return set(range(-(-self.usable // GiB)))
        return {0}


block_index = st.one_of(st.integers(min_value=0, max_value=24),
                        st.integers(min_value=-2, max_value=NB + 2))
ops = st.one_of(
    st.tuples(st.sampled_from(["plug", "unplug", "state"]), block_index,
              st.integers(min_value=0, max_value=12), st.sampled_from([0, 0, 0, MiB])),
    st.tuples(st.just("unplug_all")),
    st.tuples(st.just("resize"), st.one_of(st.integers(min_value=0, max_value=20),
                                           st.integers(min_value=0, max_value=NB))),
    st.tuples(st.just("fill"), st.integers(min_value=0, max_value=2)),
    # every other block of a range, one request each: many small runs
    st.tuples(st.just("scatter"), st.integers(min_value=0, max_value=NB - 1)),
    # and the plugged blocks of a range unplugged one by one
    st.tuples(st.just("unscatter"), st.integers(min_value=0, max_value=NB - 1)),
    st.tuples(st.just("reset")),
    # what the VMM does once the guest stopped plugging for merge-delay ms
    st.tuples(st.just("merge")),
)
KINDS = {"plug": RequestType.PLUG, "unplug": RequestType.UNPLUG, "state": RequestType.STATE}


@pytest.fixture(scope="module")
def kvm_handle():  # type: ignore[no-untyped-def]
    with Kvm() as kvm:
        yield kvm


@pytest.mark.parametrize("mode,protect,merge_delay", [
    ("dynamic", "block", 0), ("dynamic", "slot", 0), ("usable", "block", 0), ("single", "slot", 0),
    ("exact", "slot", 0), ("exact", "block", 0), ("exact", "slot", 100), ("exact", "block", 100)])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(ops, max_size=25))
def test_device_matches_the_model(kvm_handle, mode: str, protect: str, merge_delay: int,  # type: ignore[no-untyped-def]
                                  steps) -> None:
    with kvm_handle.create_vm() as vm:
        machine = small_machine(vm)
        dev = plug_device(machine, size=REGION, block=BLOCK, memslots=mode, protect=protect,
                          merge_delay=merge_delay)
        model = Model(mode, dev.addr)
        try:
            for step in steps:
                if step[0] == "merge":
                    pending = dev.merges_pending
                    assert dev.merge_memslots() <= pending      # nothing to merge: no change
                    assert not dev.merges_pending
                elif step[0] == "resize":
                    dev.set_requested_size(step[1] * BLOCK)
                    model.resize(step[1] * BLOCK)
                elif step[0] == "reset":
                    machine.system_reset()
                    model.reset()
                elif step[0] == "scatter":
                    if model.requested < NB // 2 * BLOCK:
                        dev.set_requested_size(NB // 2 * BLOCK)
                        model.resize(NB // 2 * BLOCK)
                    for block in range(step[1], min(NB, step[1] + 32), 2):
                        one_block(dev, model, RequestType.PLUG, block)
                        check(vm, dev, model, protect)
                elif step[0] == "unscatter":
                    for block in sorted(b for b in model.plugged if step[1] <= b < step[1] + 32):
                        one_block(dev, model, RequestType.UNPLUG, block)
                        check(vm, dev, model, protect)
                elif step[0] == "unplug_all":
                    got = Response.parse(dev.handle(0, Request(RequestType.UNPLUG_ALL).pack(), 10))
                    assert got == model.process(RequestType.UNPLUG_ALL, 0, 0)
                else:
                    if step[0] == "fill":     # plug up to (or just past) requested-size
                        free = [b for b in range(NB) if b not in model.plugged]
                        want = (model.requested - len(model.plugged) * BLOCK) // BLOCK + step[1]
                        step = ("plug", free[0] if free else 0, max(want, 0), 0)
                    kind, block, n, skew = KINDS[step[0]], step[1], step[2], step[3]
                    addr = max(0, dev.addr + block * BLOCK + skew)
                    got = Response.parse(dev.handle(0, Request(kind, addr, n).pack(), 10))
                    assert got == model.process(kind, addr, n), step
                check(vm, dev, model, protect)
        finally:
            machine.close()


def one_block(dev, model: Model, kind: RequestType, block: int) -> None:  # type: ignore[no-untyped-def]
    addr = dev.addr + block * BLOCK
    got = Response.parse(dev.handle(0, Request(kind, addr, 1).pack(), 10))
    assert got == model.process(kind, addr, 1), (kind, block)


def check(vm, dev, model: Model, protect: str) -> None:  # type: ignore[no-untyped-def]
    assert dev.plugged_size == len(model.plugged) * BLOCK
    assert dev.usable_region_size == model.usable
    assert {b for b in range(NB) if dev.bitmap.is_plugged(b)} == model.plugged
    mapped = model.mapped()
    if model.mode == "single":
        assert kvm_ranges(vm, dev) == {(dev.addr, REGION)}
    elif model.mode == "exact":
        if dev.merges_pending:
            mapped = check_exact_unmerged(vm, dev, model.plugged)
        else:
            mapped = check_exact(vm, dev, model.plugged)
    else:
        assert kvm_ranges(vm, dev) == expected_ranges(dev, mapped)
    if protect == "block" and model.mode != "single":
        guarded = {b for b in range(NB) if dev.memdev.is_protected(b * BLOCK, BLOCK)}
        assert guarded == {b for b in range(NB)
                           if b not in model.plugged and b // PER_SLOT in mapped}


CHUNKS = (64, 8, 1)             # blocks: 8 GiB, 1 GiB, 128 MiB (powers of 8 bytes, at most 8 GiB)
LIMIT = NB // PER_SLOT          # the reservation: one memslot per grid memslot, as dynamic


def exact_chunks(plugged: set[int], coarse: frozenset[int]) -> list[tuple[int, int]]:
    """Maximal aligned chunks of the plugged blocks outside ``coarse`` grid memslots."""
    chunks, b = [], 0
    while b < NB:
        if b not in plugged or b // PER_SLOT in coarse:
            b += 1
            continue
        size = next(c for c in CHUNKS if b % c == 0 and all(
            x in plugged and x // PER_SLOT not in coarse for x in range(b, b + c)))
        chunks.append((b, size))
        b += size
    return chunks


def check_exact(vm, dev, plugged: set[int]) -> set[int]:  # type: ignore[no-untyped-def]
    """Memslots over exactly the plugged blocks, but in coarse grid memslots; the coarse ones."""
    coarse = dev.policy.cover.coarse_cells
    expected = {(dev.addr + b * BLOCK, n * BLOCK) for b, n in exact_chunks(plugged, coarse)}
    expected |= {(dev.addr + c * GiB, GiB) for c in coarse}
    assert kvm_ranges(vm, dev) == expected
    assert len(expected) <= LIMIT
    covered = {(a - dev.addr) // BLOCK + i for a, size in expected for i in range(size // BLOCK)}
    assert plugged <= covered
    assert not covered - plugged - {b for b in range(NB) if b // PER_SLOT in coarse}
    if coarse:                  # mapped whole only while the chunks would not fit the budget
        assert all(any(b // PER_SLOT == c for b in plugged) for c in coarse)
        need = len(exact_chunks(plugged, coarse)) + sum(
            len(exact_chunks({b for b in plugged if b // PER_SLOT == c}, frozenset()))
            for c in coarse)
        assert need > LIMIT - LIMIT // 8
    return set(coarse)


def check_exact_unmerged(vm, dev, plugged: set[int]) -> set[int]:  # type: ignore[no-untyped-def]
    """Merges pending: aligned chunks of an allowed size, each fully plugged
    and outside coarse grid memslots, over exactly the plugged blocks, within
    the budget; the coarse grid memslots."""
    coarse = dev.policy.cover.coarse_cells
    ranges = kvm_ranges(vm, dev)
    assert len(ranges) <= LIMIT
    covered: list[int] = []
    for addr, size in ranges:
        first, n = (addr - dev.addr) // BLOCK, size // BLOCK
        if (addr - dev.addr) % GiB == 0 and size == GiB and first // PER_SLOT in coarse:
            continue
        assert n in CHUNKS and first % n == 0, (first, n)
        blocks = range(first, first + n)
        assert all(b in plugged and b // PER_SLOT not in coarse for b in blocks), (first, n)
        covered.extend(blocks)
    assert len(covered) == len(set(covered)), "two memslots overlap"
    assert {b for b in plugged if b // PER_SLOT not in coarse} == set(covered)
    return set(coarse)
