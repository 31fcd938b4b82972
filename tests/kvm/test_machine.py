"""The public Machine contract, end to end on the running kernel."""
import errno
import threading

import pytest

from kvmgate.asm import assemble
from kvmgate.kvm import Kvm

from kvmgate import (DEFAULT_ALLOW, DEFAULT_DENY, EXIT_REASON_FILTER,
                     EXIT_REASON_UNKNOWN, READ, WRITE, FilterError, GuestError, InjectGP,
                     KvmError, Machine, MsrFilter, MsrRange)
from tests.stop_race import StopBetween

pytestmark = pytest.mark.kvm

UNKNOWN_MSR = 0x12345678      # KVM does not implement it: UNKNOWN
XSS = 0xDA0


def test_contract_example():
    m = Machine("""
        mov ecx, 0xda0
        rdmsr
        mov r8, rax
        out 0x80, al
        mov ecx, 0xda0
        rdmsr
        mov r9, rax
        hlt
    """)
    m.enable_user_space_msr(EXIT_REASON_FILTER | EXIT_REASON_UNKNOWN)
    m.set_msr_filter(MsrFilter([MsrRange(READ | WRITE, 0xda0, 1, b"\x00")], flags=DEFAULT_ALLOW))
    seen = []

    @m.on_msr
    def handle(exit):
        seen.append(exit)
        if not exit.is_write:
            return 0x1234
        raise InjectGP

    syncs = []

    @m.on_port(0x80)
    def sync(machine, value):
        syncs.append(value)
        machine.set_msr_filter(None)

    r = m.run(timeout=5)
    assert r.regs.r8 == 0x1234
    assert syncs == [0x1234 & 0xFF]
    assert len(r.msr_exits) == 1 and r.msr_exits[0].reason == EXIT_REASON_FILTER
    assert r.msr_exits[0].index == 0xDA0 and not r.msr_exits[0].is_write
    assert r.msr_exits == seen
    # after the swap the filter is gone: the kernel handles XSS itself, no exit; what it does is
    # the kernel's answer, read from a fresh VM with no filter and no user-space exits
    with Machine("mov ecx, 0xda0\nrdmsr\nhlt") as plain:
        kernel = [f.index for f in plain.run(timeout=30).gp_faults]
    assert [f.index for f in r.gp_faults] == kernel
    m.close()


def test_read_reply_sets_eax_edx_and_write_sees_value():
    with Machine(f"""
        mov ecx, {UNKNOWN_MSR}
        rdmsr
        mov r8, rax
        mov r9, rdx
        mov eax, 0xdeadbeef
        mov edx, 0x12345678
        wrmsr
        hlt""") as m:
        m.enable_user_space_msr(EXIT_REASON_UNKNOWN)
        m.on_msr(lambda e: 0x1122334455667788 if not e.is_write else None)
        r = m.run(timeout=5)
    assert (r.regs.r8, r.regs.r9) == (0x55667788, 0x11223344)
    w = r.msr_exits[1]
    assert w.is_write and w.data == 0x12345678DEADBEEF and w.reason == EXIT_REASON_UNKNOWN
    assert r.gp_faults == []


def test_injected_gp_is_recorded_and_rax_rdx_zero():
    with Machine(f"""
        mov rax, -1
        mov rdx, -1
        mov ecx, {UNKNOWN_MSR}
    fault:
        rdmsr
        mov r8, rax
        mov r9, rdx
        hlt""") as m:
        m.enable_user_space_msr(EXIT_REASON_UNKNOWN)

        @m.on_msr
        def h(exit):
            raise InjectGP

        r = m.run(timeout=5)
    assert len(r.gp_faults) == 1 and r.gp_faults[0].index == UNKNOWN_MSR
    prefix = assemble(f"mov rax, -1\nmov rdx, -1\nmov ecx, {UNKNOWN_MSR}", 0x10000)
    assert r.gp_faults[0].rip == 0x10000 + len(prefix)
    assert (r.regs.r8, r.regs.r9) == (0, 0)


def test_no_handler_means_gp():
    with Machine(f"mov ecx, {UNKNOWN_MSR}\nrdmsr\nhlt") as m:
        m.enable_user_space_msr(EXIT_REASON_UNKNOWN)
        r = m.run(timeout=5)
    assert [e.index for e in r.msr_exits] == [UNKNOWN_MSR]
    assert [f.index for f in r.gp_faults] == [UNKNOWN_MSR]


def test_without_exits_unknown_msr_is_gp_from_kernel():
    with Machine(f"mov ecx, {UNKNOWN_MSR}\nrdmsr\nhlt") as m:
        r = m.run(timeout=5)
    assert r.msr_exits == [] and [f.index for f in r.gp_faults] == [UNKNOWN_MSR]


def test_handler_exception_stops_run_and_propagates():
    with Machine(f"mov ecx, {UNKNOWN_MSR}\nrdmsr\nhlt") as m:
        m.enable_user_space_msr(EXIT_REASON_UNKNOWN)

        @m.on_msr
        def h(exit):
            raise ValueError("handler bug")

        with pytest.raises(ValueError, match="handler bug"):
            m.run(timeout=5)
        # the machine is reusable afterwards: the pending completion was flushed
        m.on_msr(lambda e: 7)
        r = m.run(timeout=5)
        assert r.regs.rax == 7


def test_filter_swap_mid_run_at_sync_port():
    with Machine("""
        mov ecx, 0x10
        rdmsr
        out 0x80, al
        mov ecx, 0x10
        rdmsr
        hlt""") as m:
        m.enable_user_space_msr(EXIT_REASON_FILTER)
        m.set_msr_filter(MsrFilter([MsrRange.all(READ, 0x10, 1, allow=False)]))
        m.on_msr(lambda e: 42)
        m.on_port(0x80)(lambda mach, v: mach.set_msr_filter(None))
        r = m.run(timeout=5)
    assert [e.index for e in r.msr_exits] == [0x10]      # only the access before the swap


def test_timeout_stops_a_spinning_guest():
    with Machine("spin: jmp spin") as m:
        with pytest.raises(TimeoutError, match="did not halt within 0.2 s"):
            m.run(timeout=0.2)                  # returns: every vCPU left KVM_RUN
        assert m.last_result.regs.rip == 0x10000             # stopped in its spin loop
        # and the machine still works after a timeout
        with pytest.raises(TimeoutError):
            m.run(timeout=0.1)


def test_a_stop_between_the_loops_look_and_its_clear_stops_the_real_vcpu():
    """The lost-stop race on the running kernel (the unit test in test_exit_loop.py plays it on
    a fake kvm_run): a stray signal interrupts KVM_RUN, the loop looks at `stopping`, and a
    stop() lands right then (`stopping`, then immediate_exit; its signal spent outside
    KVM_RUN).  KVM_RUN must return EINTR at once on the spinning guest.  A watchdog kicks the
    vCPU after 60 s only if the stop was lost, and the test fails then."""
    import signal as sg
    from kvmgate.vm import KICK_SIGNAL, LoopContext, VcpuState, run_vcpu

    with Machine("spin: jmp spin") as m:
        m.reset()                                    # long mode at the program's start
        vcpu = m.vcpus[0]

        threads, done, lost = StopBetween(vcpu), threading.Event(), []
        me = threading.get_ident()

        def watchdog():
            if not done.wait(60):
                lost.append(True)
                vcpu.set_immediate_exit(True)
                sg.pthread_kill(me, KICK_SIGNAL)

        dog = threading.Thread(target=watchdog)
        dog.start()
        vcpu.set_immediate_exit(True)                # the stray signal's EINTR
        try:
            run_vcpu(VcpuState(0, vcpu), LoopContext(m.gate, threads, {}, m, None, True))
        finally:
            done.set()
            dog.join()
        assert lost == [] and threads.looks == 2 and threads.kicks == 1


def test_timeout_from_another_thread():
    out = {}

    def worker():
        with Machine("spin: jmp spin") as m:
            try:
                m.run(timeout=0.2)
            except TimeoutError as e:
                out["err"] = e

    t = threading.Thread(target=worker)
    t.start()
    t.join(10)
    assert not t.is_alive() and isinstance(out.get("err"), TimeoutError)


def test_timeout_while_handler_keeps_guest_busy():
    with Machine(f"again: mov ecx, {UNKNOWN_MSR}\nrdmsr\njmp again") as m:
        m.enable_user_space_msr(EXIT_REASON_UNKNOWN)
        m.on_msr(lambda e: 0)
        with pytest.raises(TimeoutError):
            m.run(timeout=0.2)


@pytest.mark.parametrize("flt", [
    MsrFilter([], flags=DEFAULT_DENY),
    MsrFilter([MsrRange(0, 0x10, 1, b"\x01")]),
    MsrFilter([MsrRange(4, 0x10, 1, b"\x01")]),
    MsrFilter([MsrRange(READ, 0x10, 0x3001, bytes(0x601))]),
    MsrFilter([], flags=2),
    MsrFilter([MsrRange(READ, 0x10, 8, b"")]),
    MsrFilter([MsrRange(READ, i, 1, b"\x01") for i in range(17)]),
])
def test_rejected_filters_raise_einval_and_keep_old_filter(flt):
    with Machine("mov ecx, 0x10\nrdmsr\nhlt") as m:
        m.enable_user_space_msr(EXIT_REASON_FILTER)
        old = MsrFilter([MsrRange.all(READ, 0x10, 1, allow=False)])
        m.set_msr_filter(old)
        with pytest.raises(FilterError) as ei:
            m.set_msr_filter(flt)
        assert isinstance(ei.value, KvmError) and ei.value.errno == errno.EINVAL
        m.on_msr(lambda e: 1)
        r = m.run(timeout=5)
        assert [e.reason for e in r.msr_exits] == [EXIT_REASON_FILTER]   # old filter in force


def test_kernel_errno_for_bad_exit_mask():
    with Machine() as m:
        with pytest.raises(KvmError) as ei:
            m.enable_user_space_msr(8)
        assert ei.value.errno == errno.EINVAL and "KVM_ENABLE_CAP" in str(ei.value)


def test_guest_exception_is_reported():
    with Machine("ud2") as m:
        with pytest.raises(GuestError, match="#UD"):
            m.run(timeout=5)


def test_labels_and_rip_of_faults():
    with Machine(f"""
        jmp over
        nop
    over:
        mov ecx, {UNKNOWN_MSR}
    here:
        rdmsr
        hlt""") as m:
        r = m.run(timeout=5)
    # the faulting RDMSR sits right after the 5-byte `mov ecx, imm32` that follows jmp+nop
    assert r.gp_faults[0].rip == 0x10000 + 2 + 1 + 5


def test_close_releases_fds():
    import os
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        Machine().close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_kick_signal_without_handler_fails_fast_instead_of_killing(monkeypatch):
    import signal as sig
    from kvmgate import machine as mach
    with Machine("spin: jmp spin") as m:
        old = sig.signal(mach.KICK_SIGNAL, sig.SIG_DFL)
        monkeypatch.setattr(mach.threading, "current_thread", lambda: object())  # "not main"
        try:
            with pytest.raises(RuntimeError, match="no handler"):
                m.run(timeout=0.1)
        finally:
            monkeypatch.undo()
            sig.signal(mach.KICK_SIGNAL, old)
        with pytest.raises(TimeoutError):
            m.run(timeout=0.1)          # handler back: works again


def test_missing_capability_is_named(monkeypatch):
    from kvmgate import kvm as K
    monkeypatch.setitem(K.REQUIRED_CAPS, "KVM_CAP_FROM_THE_FUTURE", 0x7FFFFFF0)
    with pytest.raises(KvmError, match="missing capabilities: KVM_CAP_FROM_THE_FUTURE") as ei:
        K.Kvm()
    assert ei.value.ioctl == "KVM_CHECK_EXTENSION"


def test_msr_index_lists():
    """KVM_GET_MSR_INDEX_LIST and KVM_GET_MSR_FEATURE_INDEX_LIST (grown on E2BIG): the feature
    list always holds MSR_IA32_UCODE_REV (0x8b: kvm_get_feature_msr answers it on every host)."""
    with Kvm() as k:
        saved, features = k.msr_index_list(), k.msr_feature_index_list()
    assert 0x8B in features
    assert 0xC0000082 in saved                       # LSTAR: saved/restored for every guest
    assert len(set(saved)) == len(saved) and len(set(features)) == len(features)


def test_on_port_direct_form_like_on_gp():
    seen = []
    with Machine("mov al, 7\nout 0x80, al\nin al, 0x81\nmov r8, rax\nhlt") as m:
        assert m.on_port(0x80, lambda mach, v: seen.append(v)) is not None
        m.on_port(0x81, lambda mach, v: 0x5a)
        r = m.run(timeout=10)
    assert seen == [7] and r.regs.r8 & 0xff == 0x5a


FLOOD = "mov rbx, {n}\nagain:\nmov ecx, 0x1a0\nrdmsr\ndec rbx\njnz again\nhlt\n"


@pytest.mark.parametrize("keep", [True, False])
def test_keep_exits_false_keeps_counts_not_lists(keep):
    """Memory under an exit flood: with keep_exits=False nothing per exit is kept (the lists
    stay empty however many exits there are), the counts are exact."""
    n = 5000
    with Machine(FLOOD.format(n=n), vcpus=2, keep_exits=keep) as m:
        m.enable_user_space_msr(EXIT_REASON_FILTER)
        m.set_msr_filter(MsrFilter([MsrRange.all(READ, 0x1a0, 1, allow=False)]))
        m.on_msr(lambda e: InjectGP)
        r = m.run(timeout=60)
    assert r.msr_exit_count == r.gp_fault_count == 2 * n
    assert [v.msr_exit_count for v in r.vcpus] == [n, n]
    if keep:
        assert len(r.msr_exits) == len(r.gp_faults) == 2 * n
    else:
        assert r.msr_exits == [] and r.gp_faults == [] and all(not v.msr_exits for v in r.vcpus)
    assert m.last_result.msr_exit_count == 2 * n
