"""VcpuGate: another thread keeps the vCPU out of guest code (no KVM: a thread plays the vCPU)."""

from __future__ import annotations

import threading

import pytest

from kvmmem.vmm.vcpu_gate import VcpuGate


class FakeVcpu:
    """A thread that 'runs guest code' until kicked, like KVM_RUN, and logs what it did."""

    def __init__(self) -> None:
        self.kicked = threading.Event()
        self.gate = VcpuGate(self.kicked.set, timeout=5)
        self.log: list[str] = []
        self.stop = False
        self.runs = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop:
            self.gate.enter_guest()
            self.log.append("enter")
            self.runs += 1
            self.kicked.wait(0.01)          # guest code until a kick (or an exit of its own)
            self.kicked.clear()
            self.log.append("leave")
            self.gate.leave_guest()


def test_a_change_from_another_thread_waits_for_the_vcpu_to_leave() -> None:
    vcpu = FakeVcpu()
    vcpu.thread.start()
    try:
        for _ in range(50):
            with vcpu.gate.quiesced():
                assert not vcpu.gate.in_guest
                vcpu.log.append("change")
                runs = vcpu.runs
                threading.Event().wait(0.002)
                assert vcpu.runs == runs            # it did not enter again meanwhile
    finally:
        vcpu.stop = True
        vcpu.thread.join(5)
    # every change happened between a leave and the next enter
    for i, entry in enumerate(vcpu.log):
        if entry == "change":
            before = [e for e in vcpu.log[:i] if e != "change"]
            assert not before or before[-1] == "leave"
    assert vcpu.gate.quiesces == 50


def test_on_the_vcpu_thread_it_does_not_wait() -> None:
    gate = VcpuGate(lambda: pytest.fail("kicked itself"), timeout=0.1)
    gate.enter_guest()          # this thread is the vCPU thread now, "in an exit"
    with gate.quiesced():
        pass
    assert gate.quiesces == 0


def test_no_vcpu_running_means_no_wait_and_no_kick() -> None:
    gate = VcpuGate(lambda: pytest.fail("kicked with no vCPU in the guest"), timeout=0.1)
    with gate.quiesced():
        assert not gate.in_guest


def test_a_vcpu_that_does_not_stop_times_out_and_the_gate_opens_again() -> None:
    gate = VcpuGate(lambda: None, timeout=0.05)      # a kick that does nothing
    entered = threading.Event()

    def vcpu() -> None:
        gate.enter_guest()
        entered.set()

    t = threading.Thread(target=vcpu)
    t.start()
    t.join()
    assert entered.is_set() and gate.in_guest
    with pytest.raises(TimeoutError, match="did not leave KVM_RUN"):
        with gate.quiesced():
            pytest.fail("the change ran although the vCPU was in the guest")
    gate.leave_guest()
    reentered = threading.Event()
    t = threading.Thread(target=lambda: (gate.enter_guest(), reentered.set()))
    t.start()
    t.join(5)
    assert reentered.is_set()                        # not held any more
