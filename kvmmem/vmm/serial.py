"""A 16550 UART, output side: enough for Linux's early console and the test guest."""

from __future__ import annotations

from collections.abc import Callable

THR, IER, IIR, LCR, MCR, LSR, MSR, SCR = range(8)
LCR_DLAB = 0x80
LSR_THR_EMPTY = 0x20
LSR_TX_EMPTY = 0x40
IIR_NO_INTERRUPT = 0x01
MSR_DCD_DSR_CTS = 0xB0


class Serial16550:
    """Eight I/O ports from ``base``; bytes written to THR go to ``sink``.

    The transmitter is always empty (LSR), nothing is ever received, and no
    interrupt is raised: a polled console.
    """

    def __init__(self, sink: Callable[[bytes], None], base: int = 0x3F8) -> None:
        self.base = base
        self.sink = sink
        self.regs = bytearray(8)
        self.divisor = bytearray(2)

    def read(self, offset: int) -> int:
        dlab = self.regs[LCR] & LCR_DLAB
        if dlab and offset in (0, 1):
            return self.divisor[offset]
        if offset == THR:
            return 0
        if offset == IIR:
            return IIR_NO_INTERRUPT
        if offset == LSR:
            return LSR_THR_EMPTY | LSR_TX_EMPTY
        if offset == MSR:
            return MSR_DCD_DSR_CTS
        return self.regs[offset]

    def write(self, offset: int, value: int) -> None:
        dlab = self.regs[LCR] & LCR_DLAB
        if dlab and offset in (0, 1):
            self.divisor[offset] = value & 0xFF
        elif offset == THR:
            self.sink(bytes([value & 0xFF]))
        elif offset not in (IIR, LSR, MSR):
            self.regs[offset] = value & 0xFF

    def save_state(self) -> dict[str, str]:
        """The registers a driver programmed (hex), for a snapshot."""
        return {"regs": self.regs.hex(), "divisor": self.divisor.hex()}

    def load_state(self, state: dict[str, str]) -> None:
        regs, divisor = bytes.fromhex(state["regs"]), bytes.fromhex(state["divisor"])
        if len(regs) != 8 or len(divisor) != 2:
            raise ValueError("serial state: 8 register bytes and 2 divisor bytes expected")
        self.regs[:], self.divisor[:] = regs, divisor

    def reset(self) -> None:
        self.regs[:] = bytes(8)
