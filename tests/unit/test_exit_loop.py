"""The decoded exits and the exit loop on a fake kvm_run buffer (no kernel): what each answer
writes into kvm_run is checked byte for byte against the uapi layout (kernel
Documentation/virt/kvm/api.rst: kvm_run.msr.error = 1 means #GP; data is only written for
RDMSR)."""
import contextlib
import ctypes as C

import pytest

from kvmgate import uapi as u
from kvmgate.errors import InjectGP
from kvmgate.exits import GuestError
from kvmgate.msr.model import EXIT_REASON_FILTER, EXIT_REASON_UNKNOWN, MsrFilter, MsrRange, READ, WRITE
from kvmgate.vcpu_exit import HLT, INTERRUPTED, ExitDecoder, Other, PortIo, Rdmsr, Wrmsr
from kvmgate.vm import LoopContext, MsrGate, VcpuState, run_vcpu
from tests.stop_race import StopBetween

IO_DATA = 0x800          # where our fake KVM puts port data (kvm_run.io.data_offset)


class FakeVcpu:
    """A vCPU whose KVM_RUN plays a script of exits into a kvm_run-sized buffer and records,
    at each next KVM_RUN, what user space left in kvm_run for the previous exit."""

    def __init__(self, script):
        self.buf = bytearray(0x1000)
        self.run_struct = u.kvm_run.from_buffer(self.buf)
        self.exits = ExitDecoder(memoryview(self.buf))
        self.script = list(script)
        self.answers = []            # (msr.error, msr.data) or io bytes, per exit answered
        self.pending = None

    def run(self):
        if self.pending is not None:
            self.answers.append(self.pending())
        if not self.script:
            raise AssertionError("the loop ran past the end of the script")
        step = self.script.pop(0)
        return step(self)

    def set_immediate_exit(self, on):
        self.run_struct.immediate_exit = int(on)

    def get_regs(self):
        return u.kvm_regs(rip=0x10000, rax=0x10000, rcx=0x1a0, rbx=0)


def msr(write: bool, index: int, data: int = 0, reason: int = EXIT_REASON_FILTER):
    def step(v):
        r = v.run_struct
        r.exit_reason = u.KVM_EXIT_X86_WRMSR if write else u.KVM_EXIT_X86_RDMSR
        r.msr.index, r.msr.reason, r.msr.error = index, reason, 0x55   # error: junk to overwrite
        r.msr.data = data if write else 0xDEAD
        v.pending = lambda: (r.msr.error, r.msr.data)
        return v.exits.decode()
    return step


def io(port: int, out: bool, value: int = 0, size: int = 1):
    def step(v):
        r = v.run_struct
        r.exit_reason = u.KVM_EXIT_IO
        r.io.direction = u.KVM_EXIT_IO_OUT if out else u.KVM_EXIT_IO_IN
        r.io.size, r.io.port, r.io.count, r.io.data_offset = size, port, 1, IO_DATA
        v.buf[IO_DATA:IO_DATA + size] = value.to_bytes(size, "little")
        v.pending = lambda: bytes(v.buf[IO_DATA:IO_DATA + size])
        return v.exits.decode()
    return step


def hlt(v):
    v.pending = None
    v.run_struct.exit_reason = u.KVM_EXIT_HLT
    return v.exits.decode()


def other(reason):
    def step(v):
        v.pending = None
        v.run_struct.exit_reason = reason
        return v.exits.decode()
    return step


def interrupted(v):
    v.pending = None
    return INTERRUPTED


class FakeThreads:
    def __init__(self, stop_after_kicks=None):
        self.stopping = False
        self.kicks = 0

    def interrupted(self, st):
        self.kicks += 1


class Gate:
    def __init__(self, handler):
        self.handler = handler


def loop(script, handler, ports=None, keep=True, threads=None):
    vcpu = FakeVcpu(script)
    st = VcpuState(0, vcpu)
    threads = threads or FakeThreads()
    run_vcpu(st, LoopContext(Gate(handler), threads, ports or {}, "machine", None, keep))
    return vcpu, st, threads


def test_decoder_reads_the_uapi_layout_and_reuses_the_hot_exits():
    v = FakeVcpu([msr(False, 0x1a0, reason=EXIT_REASON_UNKNOWN), msr(True, 0xC0000082, 0x1234)])
    rd = v.run()
    assert isinstance(rd, Rdmsr) and not rd.is_write
    assert (rd.index, rd.data, rd.msr_reason, rd.reason) == (0x1a0, 0xDEAD, EXIT_REASON_UNKNOWN,
                                                             u.ExitReason.KVM_EXIT_X86_RDMSR)
    rd.reply(0x1_0000_0002)
    assert v.buf[32] == 0 and int.from_bytes(v.buf[48:56], "little") == 0x1_0000_0002
    wr = v.run()
    assert isinstance(wr, Wrmsr) and (wr.index, wr.data) == (0xC0000082, 0x1234)
    wr.fail()
    assert v.buf[32] == 1
    assert v.exits.decode() is wr                   # no allocation per MSR exit
    assert isinstance(FakeVcpu([other(u.KVM_EXIT_SHUTDOWN)]).run(), Other)
    v.set_immediate_exit(True)
    assert v.buf[1] == 1


def test_reply_masks_to_64_bits_and_write_reply_leaves_data_alone():
    v = FakeVcpu([msr(False, 0x10), msr(True, 0x10, 0x77)])
    v.run().reply(-1)
    assert int.from_bytes(v.buf[48:56], "little") == (1 << 64) - 1
    v.run().reply(0x99)
    assert int.from_bytes(v.buf[48:56], "little") == 0x77 and v.buf[32] == 0


def test_loop_answers_each_kind_of_handler_result():
    def handler(ex):
        return {0x10: 0xABC, 0x11: None, 0x12: InjectGP}.get(ex.index) if not ex.is_write else \
            {0x20: None, 0x21: 0x5}.get(ex.index, InjectGP)

    script = [msr(False, 0x10), msr(False, 0x11), msr(False, 0x12), msr(True, 0x20, 0x7),
              msr(True, 0x21, 0x8), msr(True, 0x22, 0x9), hlt]
    v, st, _ = loop(script, handler)
    assert v.answers == [
        (0, 0xABC),     # read with a value: error 0, EDX:EAX = value
        (1, 0xDEAD),    # read answered None: #GP (no value to give)
        (1, 0xDEAD),    # InjectGP
        (0, 0x7),       # write completed: data untouched
        (0, 0x8),       # a write's return value is not written back
        (1, 0x9),       # write refused
    ]
    assert [e.reply for e in st.msr_exits] == [0xABC, "gp", "gp", None, None, "gp"]
    assert st.msr_count == 6 and st.exits == 7          # HLT is an exit too


def test_raised_inject_gp_and_no_handler_mean_gp():
    def handler(ex):
        raise InjectGP
    v, st, _ = loop([msr(False, 0x10), hlt], handler)
    assert v.answers == [(1, 0xDEAD)]
    v, st, _ = loop([msr(True, 0x10, 3), hlt], None)
    assert v.answers == [(1, 3)] and st.msr_exits[0].reply == "gp"


def test_keep_exits_false_counts_without_keeping():
    v, st, _ = loop([msr(False, 0x10)] * 50 + [hlt], lambda ex: 1, keep=False)
    assert st.msr_exits == [] and st.msr_count == 50 and st.exits == 51


def test_interrupted_clears_immediate_exit_and_calls_the_threads_or_stops():
    def kicked(v):
        v.run_struct.immediate_exit = 1
        return interrupted(v)

    v, st, threads = loop([kicked, kicked, hlt], None)
    assert threads.kicks == 2 and v.run_struct.immediate_exit == 0 and st.exits == 1
    stopping = FakeThreads()
    stopping.stopping = True
    v, st, threads = loop([kicked], None, threads=stopping)       # returns: no HLT needed
    assert threads.kicks == 0 and st.exits == 0


def guest_spins(v):
    """KVM_RUN of a guest that makes no exits: EINTR at once when immediate_exit is set
    (KVM_CAP_IMMEDIATE_EXIT), else it would run for ever (the test fails instead)."""
    if v.run_struct.immediate_exit:
        return interrupted(v)
    raise AssertionError("KVM_RUN entered with immediate_exit clear after stop(): stop lost")


def test_a_stop_landing_between_the_look_and_the_clear_is_not_lost():
    v = FakeVcpu([interrupted, guest_spins])      # a stray signal, then the spinning guest
    threads = StopBetween(v)
    st = VcpuState(0, v)
    run_vcpu(st, LoopContext(Gate(None), threads, {}, "machine", None, True))
    assert threads.looks == 2 and threads.kicks == 1 and v.script == []
    assert v.run_struct.immediate_exit == 0


def test_ports_out_in_and_unhandled_in_reads_all_ones():
    seen = []
    ports = {0x80: lambda m, value: seen.append((m, value)), 0x81: lambda m, value: 0x1234}
    v, st, _ = loop([io(0x80, True, 0x2A), io(0x81, False, size=2), io(0x82, False, size=1),
                     io(0x83, True, 5), hlt], None, ports)
    assert seen == [("machine", 0x2A)]
    assert v.answers == [b"\x2a", b"\x34\x12", b"\xff", b"\x05"]


def test_unexpected_exit_is_a_guest_error_naming_it():
    with pytest.raises(GuestError, match="KVM_EXIT_SHUTDOWN at RIP 0x10000"):
        loop([other(u.KVM_EXIT_SHUTDOWN)], None)
    with pytest.raises(GuestError, match=r"KVM_EXIT_77\(unknown\)"):
        loop([other(77)], None)


class FakeVm:
    def __init__(self):
        self.filters, self.masks = [], []

    def enable_cap(self, cap, mask):
        self.masks.append(mask)

    def set_msr_filter(self, raw):
        self.filters.append(raw)


class Exit:
    def __init__(self, index, is_write, reason=EXIT_REASON_FILTER, data=0):
        self.index, self.is_write, self.reason, self.data = index, is_write, reason, data
        self.stored = []

    def host_access(self, value=None):
        self.stored.append(value)
        return value


def test_gate_routes_intercepted_writes_and_keeps_the_owners_answers():
    gate = MsrGate(FakeVm(), contextlib.nullcontext)
    owner_calls = []
    gate.on_msr(lambda ex: owner_calls.append(ex.index) or 0x42)
    gate.set_msr_filter(MsrFilter([MsrRange.all(WRITE, 0x30, 1, allow=False)]))
    gate.enable_user_space_msr(EXIT_REASON_UNKNOWN)               # the owner has no FILTER exits
    first = gate.add_interception({0x10, 0x30}, lambda ex: 0x1000 + ex.data)
    second = gate.add_interception({0x10, 0x11}, lambda ex: InjectGP)
    assert gate.vm.masks[-1] == EXIT_REASON_UNKNOWN | EXIT_REASON_FILTER
    route = gate.handler
    ex = Exit(0x10, True, data=5)
    assert route(ex) is None and ex.stored == [0x1005]            # the first registered wins
    assert route(Exit(0x11, True)) is InjectGP
    # the owner's filter denies writes of 0x30 and the owner has no FILTER exits: #GP, as KVM
    assert route(Exit(0x30, True)) is InjectGP and owner_calls == []
    assert route(Exit(0x20, False)) is InjectGP and owner_calls == []   # FILTER, not the owner's
    assert route(Exit(0x99, False, EXIT_REASON_UNKNOWN)) == 0x42 and owner_calls == [0x99]
    first.remove()
    second.remove()
    assert gate.handler is not route and gate.vm.masks[-1] == EXIT_REASON_UNKNOWN
    assert gate.handler(Exit(0x99, False, EXIT_REASON_UNKNOWN)) == 0x42


def test_gate_rejects_a_bad_mask_and_changes_nothing():
    from kvmgate.errors import KvmError
    gate = MsrGate(FakeVm(), contextlib.nullcontext)
    with pytest.raises(KvmError):
        gate.enable_user_space_msr(1 << 64)
    assert gate.exit_mask == 0 and gate.vm.masks == []


def test_exit_views_have_no_instance_dict():
    v = FakeVcpu([msr(False, 1)])
    ex = v.run()
    assert not hasattr(ex, "__dict__") and C.sizeof(u.kvm_run) <= len(v.buf)
    assert isinstance(FakeVcpu([io(1, True)]).run(), PortIo) and HLT.reason == u.KVM_EXIT_HLT
    assert (READ, WRITE) == (1, 2)


class CountingRunLoop:
    """A run loop (vm.register_run_loop's protocol) that 'answers' `k` MSR exits itself before
    handing each exit of the script to Python."""

    def __init__(self, k):
        self.k, self.made, self.finished = k, [], False

    def vcpu(self, st):
        outer = self

        class V:
            answered = 0

            def run(self):
                self.answered += outer.k
                return st.vcpu.run()
        v = V()
        self.made.append(v)
        return v

    def finish(self):
        self.finished = True


def test_a_run_loop_replaces_kvm_run_and_its_exits_are_counted_live():
    st = VcpuState(0, FakeVcpu([msr(False, 0x10), interrupted, io(0x80, True, 1), hlt]))
    rl = CountingRunLoop(3)
    seen = []

    class Threads:
        stopping = False

        def interrupted(self, s):
            seen.append(s.live_exits())

    run_vcpu(st, LoopContext(Gate(lambda ex: 5), Threads(), {0x80: lambda m, v: None}, "machine",
                             None, True, rl))
    # 4 calls of run(): 3 answered each; Python saw the RDMSR, the port and HLT (3 exits)
    assert st.exits == 3 + 12 and st.msr_count == 1 + 12
    assert st.live_exits() == (15, 13) and st.live[2] is None
    assert seen == [(1 + 6, 1 + 6)]            # at the kick: 1 exit of Python's, 6 of the loop's
