"""The memory side of a virtio-mem device: its RAM region and memslot aliases.

The policy decides *which* spans are memslots; this module maps and unmaps
them through the memory layer, never through KVM: a span is an unmergeable
alias of the device's RAM region inside the container
``virtio-mem-memslots`` (QEMU's names), so mapping or unmapping it is
exactly one KVM memslot change made by the KVM listener. In ``single`` mode
the RAM region itself is mapped, as before QEMU had memslots.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvmmem.devices.memslot_policy import MemslotSpan
from kvmmem.memory.address_space import memory_transaction
from kvmmem.memory.host import HostMemory
from kvmmem.memory.region import MemoryRegion

CONTAINER_NAME = "virtio-mem-memslots"


class VirtioMemBacking:
    """Maps spans of a device's RAM region as unmergeable aliases."""

    def __init__(self, host: HostMemory, aliases: bool,
                 alias_name: Callable[[MemslotSpan], str]) -> None:
        self.host = host
        self.ram = MemoryRegion.ram(host.name, host)
        self.top = MemoryRegion.container(CONTAINER_NAME, host.size) if aliases else self.ram
        self._alias_name = alias_name
        # The mapped aliases by (offset, size): tuple keys hash in C, on every
        # request. An alias is dropped once unmapped: memslots=exact maps
        # spans of ever new sizes and offsets, and keeping them all would
        # grow without bound over a long-running guest's plugs.
        self._aliases: dict[tuple[int, int], MemoryRegion] = {}

    @property
    def nb_aliases(self) -> int:
        """Alias regions held (the mapped ones, and those of a failed remap)."""
        return len(self._aliases)

    def alias(self, span: MemslotSpan) -> MemoryRegion:
        """The (possibly not yet mapped) alias of ``span``."""
        key = (span.offset, span.size)
        alias = self._aliases.get(key)
        if alias is None:
            alias = MemoryRegion.alias(self._alias_name(span), self.ram, span.offset, span.size,
                                       unmergeable=True)
            self._aliases[key] = alias
        return alias

    def remap(self, unmap: Sequence[MemslotSpan], map: Sequence[MemslotSpan]) -> None:
        """Unmap ``unmap`` and map ``map`` in one memory transaction.

        On failure (KVM refusing a slot) the memory layer has rolled the tree
        and KVM back and the error propagates: nothing changed.
        """
        top, aliases = self.top, self._aliases
        if len(unmap) + len(map) == 1:          # one mutation is its own transaction
            if unmap:
                key = (unmap[0].offset, unmap[0].size)
                top.del_subregion(aliases[key])
                del aliases[key]
            else:
                span = map[0]
                top.add_subregion(span.offset,
                                  aliases.get((span.offset, span.size)) or self.alias(span))
            return
        with memory_transaction():
            for span in unmap:
                top.del_subregion(aliases[span.offset, span.size])
            for span in map:
                top.add_subregion(span.offset,
                                  aliases.get((span.offset, span.size)) or self.alias(span))
        for span in unmap:                      # only once the transaction held
            del aliases[span.offset, span.size]
