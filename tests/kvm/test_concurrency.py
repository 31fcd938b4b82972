"""Several vCPUs and several VMs: atomic policy swaps under load, clean stops, no leaks."""
import gc
import os
import threading
import time

import pytest

from kvmgate import EXIT_REASON_FILTER, GuestError, Machine, MsrFilter, MsrRange, READ
from kvmgate.audit import AuditLog
from kvmgate.policy import compile_policy, parse_policy

pytestmark = pytest.mark.kvm

# A: 0x10 kernel, 0x35 -> 0xA.  B: 0x10 -> 0xB1 (filter denies it), 0x35 -> 0xB.
# A torn swap (B's filter with A's handlers) makes the 0x10 exit find no action: #GP.
POLICY_A = "[policy]\ndefault='allow'\n[[rule]]\nmsr=0x35\naccess='read'\naction='constant'\nvalue=0xA\n"
POLICY_B = POLICY_A.replace("0xA\n", "0xB\n") + \
    "[[rule]]\nmsr=0x10\naccess='read'\naction='constant'\nvalue=0xB1\n"
HAMMER = """
again:
    mov ecx, 0x35
    rdmsr
    cmp eax, 0xA
    je ok35
    cmp eax, 0xB
    je ok35
    ud2                      ; a value neither policy gives
ok35:
    mov ecx, 0x10
    rdmsr
    cmp qword ptr [0x100000], 0   ; the host sets this flag when it is done swapping
    je again
    hlt
"""
SWAPS = 2000
SUMMARY_LINES: list[str] = []


def test_each_vcpu_has_its_index_stack_and_results():
    with Machine("mov r8, rdi\nmov r9, rsp\nmov ecx, 0x12345678\nrdmsr\nhlt", vcpus=4) as m:
        m.enable_user_space_msr(2)
        m.on_msr(lambda e: 0x100 + e.vcpu)
        r = m.run(timeout=10)
    assert [v.regs.r8 for v in r.vcpus] == [0, 1, 2, 3]
    assert len({v.regs.r9 for v in r.vcpus}) == 4                       # own stacks
    assert [v.regs.rax for v in r.vcpus] == [0x100, 0x101, 0x102, 0x103]
    assert sorted(e.vcpu for e in r.msr_exits) == [0, 1, 2, 3]


def test_policy_swaps_under_load_are_atomic_and_audit_counts_add_up():
    a, b = (compile_policy(parse_policy(t)) for t in (POLICY_A, POLICY_B))
    audit = AuditLog(None, rate=1e12, burst=1 << 60)
    # log every decision so audit counts can be checked against exits
    a_log = compile_policy(parse_policy(POLICY_A.replace("value=0xA\n", "value=0xA\nlog=true\n")))
    b_log = compile_policy(parse_policy(POLICY_B.replace("0xB\n", "0xB\nlog=true\n").replace("0xB1\n", "0xB1\nlog=true\n")))
    swaps = 0
    with Machine(HAMMER, vcpus=3) as m:
        m.set_policy(a_log, audit)

        def swapper():
            nonlocal swaps
            try:
                time.sleep(0.05)
                for i in range(SWAPS):
                    m.set_policy(b_log if i % 2 == 0 else a_log, audit)
                    swaps += 1
                    time.sleep(0.0002)        # let the vCPUs run between swaps
            finally:
                m.write_mem(0x100000, (1).to_bytes(8, "little"))

        t = threading.Thread(target=swapper)
        t.start()
        r = m.run(timeout=120)
        t.join(30)
    assert not t.is_alive()
    assert swaps == SWAPS
    assert r.gp_faults == [], r.gp_faults[:5]          # no torn filter/handler pair
    exits = sum(len(v.msr_exits) for v in r.vcpus)
    SUMMARY_LINES.append(f"stress: {SWAPS} policy swaps while 3 vCPUs made {exits} user-space decisions "
          f"({[len(v.msr_exits) for v in r.vcpus]} per vCPU) in {r.seconds:.2f} s; "
          f"{audit.written} audit records, 0 torn")
    assert audit.written == exits == sum(s["count"] for s in audit.summary())
    assert {e.index for e in r.msr_exits} <= {0x10, 0x35}
    for e in r.msr_exits:                               # each reply is one policy's answer
        assert {e.index: e.reply} in ({0x35: 0xA}, {0x35: 0xB}, {0x10: 0xB1})


def test_error_in_one_vcpu_stops_all():
    with Machine("cmp rdi, 1\njne spin\nud2\nspin: jmp spin", vcpus=3) as m:
        with pytest.raises(GuestError, match="vCPU 1.*#UD"):
            m.run()        # no timeout: only vCPU 1's error can end the run (else pytest-timeout)


def test_timeout_stops_all_vcpus():
    with Machine("spin: jmp spin", vcpus=4) as m:
        with pytest.raises(TimeoutError):
            m.run(timeout=0.3)


def test_handler_exception_in_one_vcpu_stops_all():
    with Machine("again: mov ecx, 0x12345678\nrdmsr\njmp again", vcpus=2) as m:
        m.enable_user_space_msr(2)

        def h(e):
            if e.vcpu == 1:
                raise RuntimeError("boom on vCPU 1")
            return 0

        m.on_msr(h)
        with pytest.raises(RuntimeError, match="boom"):
            m.run(timeout=30)


def test_several_machines_with_own_policies_run_at_once():
    out = {}

    def one(name, value):
        with Machine("mov ebx, 2000\nagain: mov ecx, 0x35\nrdmsr\ndec ebx\njnz again\nhlt", vcpus=2) as m:
            m.set_policy(parse_policy(POLICY_A.replace("0xA", hex(value))))
            r = m.run(timeout=60)
            out[name] = {v.regs.rax for v in r.vcpus}

    threads = [threading.Thread(target=one, args=(f"vm{i}", 0x100 + i)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert out == {f"vm{i}": {0x100 + i} for i in range(4)}


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))


def test_hundreds_of_vms_leave_no_fds_or_memory_behind():
    def cycle():
        with Machine("mov ecx, 0x10\nrdmsr\nhlt", vcpus=2) as m:
            m.set_msr_filter(MsrFilter([MsrRange.all(READ, 0x10, 1, allow=False)]))
            m.enable_user_space_msr(4)
            m.on_msr(lambda e: 1)
            m.run(timeout=10)

    for _ in range(20):
        cycle()                                  # warm caches and allocators
    gc.collect()
    fds, rss = len(os.listdir("/proc/self/fd")), _rss_kb()
    threads = threading.active_count()          # other tests' daemon threads may live on
    for _ in range(300):
        cycle()
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == fds
    assert _rss_kb() - rss < 20 * 1024, (rss, _rss_kb())     # < 20 MiB over 300 VMs of 4 MiB
    assert threading.active_count() <= threads


@pytest.mark.parametrize("how", ["stop", "close"])
def test_stop_or_close_while_running_stops_and_releases(how):
    """From another thread, while run() is in progress: run() raises Stopped, never an error
    from fds or mappings closed under it (close() waits for the run to end)."""
    from kvmgate import Stopped
    for _ in range(10 if how == "close" else 1):
        m = Machine("again:\nmov ecx, 0x1a0\nrdmsr\njmp again", vcpus=2)
        m.enable_user_space_msr(EXIT_REASON_FILTER)
        m.set_msr_filter(MsrFilter([MsrRange.all(READ, 0x1a0, 1, allow=False)]))
        m.on_msr(lambda e: 1)
        errors = []

        def run():
            try:
                m.run(timeout=60)
            except Exception as e:
                errors.append(e)

        t = threading.Thread(target=run)
        t.start()
        assert m.wait_running(30)
        getattr(m, how)()
        t.join(30)
        assert not t.is_alive() and [type(e) for e in errors] == [Stopped], errors
        m.close()
        assert m.vm is None and m.vcpus == []


def test_a_vcpu_that_starts_during_a_swap_waits_for_its_end():
    """A swap in progress when run() starts its vCPU threads: they must not run half of it
    (B's filter with A's handler would #GP the read of 0x10)."""
    a, b = (compile_policy(parse_policy(t)) for t in (POLICY_A, POLICY_B))
    swapping, release, faulted = threading.Event(), threading.Event(), threading.Event()
    guest = "mov ecx, 0x10\nrdmsr\nmov r8, rax\nhlt"
    with Machine(guest, vcpus=2) as m:
        m.set_policy(a)
        m.on_gp(lambda f: faulted.set())
        out = {}

        def swap_by_halves():
            with m.quiesced():
                m.set_msr_filter(b.filter)             # B's filter, A's handler still
                swapping.set()
                release.wait(60)
                m.set_policy(b)                        # nested: completes the swap

        def run():
            out["r"] = m.run(timeout=60)

        s = threading.Thread(target=swap_by_halves)
        s.start()
        assert swapping.wait(30)
        t = threading.Thread(target=run)
        t.start()
        assert m.wait_running(30)       # both vCPU threads started (False: they ran to HLT)
        assert not faulted.wait(0.5)                   # parked, not running into the half swap
        release.set()
        s.join(30)
        t.join(30)
    r = out["r"]
    assert r.gp_faults == [] and [v.regs.r8 for v in r.vcpus] == [0xB1, 0xB1]


def test_a_blocked_vcpu_counts_as_parked_and_leaves_after_the_pause():
    """Machine.blocked() (a handler waiting on another party): quiesced() counts the vCPU as
    parked without a kick, and a vCPU leaving the block while the pause is on waits for its
    end before it goes on (the lock-free fast path of vm/threads.py must keep both)."""
    guest = "mov ecx, 0x35\nrdmsr\nmov r8, rax\nhlt"
    inside, leave, left, pausing = (threading.Event() for _ in range(4))
    seen, out = {}, {}
    with Machine(guest) as m:
        m.set_msr_filter(MsrFilter([MsrRange.all(READ, 0x35, 1, allow=False)]))
        m.enable_user_space_msr(EXIT_REASON_FILTER)

        @m.on_msr
        def handler(ex):
            with m.blocked(ex.vcpu):
                inside.set()
                leave.wait(60)
            seen["pause_on"] = pausing.is_set()
            left.set()
            return 0x77

        t = threading.Thread(target=lambda: out.update(r=m.run(timeout=60)))
        t.start()
        assert inside.wait(30)
        with m.quiesced(timeout=30):        # the blocked vCPU counts as parked
            pausing.set()
            leave.set()
            assert not left.wait(0.5)       # it waits for the pause to end
            pausing.clear()
        assert left.wait(30)
        t.join(30)
    assert seen["pause_on"] is False
    assert out["r"].vcpus[0].regs.r8 == 0x77
