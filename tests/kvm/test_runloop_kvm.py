"""The C run loop (csrc/runloop.c via kvmgate.engine.runloop) on /dev/kvm: the exits an
EnginePolicy answers are answered in C, and the guest sees exactly what the Python exit loop
gives it, with the same audit records, counts and kept exits (hand-written expectations from
test_engine_kvm; every action, logged or not; enforce and audit mode; 1 and 2 vCPUs).  A vCPU
spinning in the C loop still stops on timeout, Machine.stop() and Ctrl-C (SIGINT); an
interception's MSR writes still reach Python; exit counts are readable while the run goes on."""
import collections
import io
import json
import signal
import threading
import time
import urllib.request

import pytest

from kvmgate import EXIT_REASON_FILTER, READ, Machine, MsrFilter, MsrRange
from kvmgate.audit import AuditFailure, AuditLog
from kvmgate.engine import CRunLoop, EnginePolicy, runloop
from kvmgate.exits import Stopped
from kvmgate.policy import compile_policy, parse_policy
from kvmgate.vm import register_run_loop, unregister_run_loop

from ..engine_policies import require_engine
from .test_engine_kvm import GUEST, POLICY, RECORDS, check_enforced

pytestmark = pytest.mark.kvm

MSR_EXITS = 11          # the MSR instructions GUEST executes
PORT_EXITS = 2          # its two #GPs, reported on the guest runtime's #GP port
SPIN = """
again:
    mov ecx, 0x35
    rdmsr
    jmp again
"""


@pytest.fixture(scope="module")
def cp():
    require_engine()
    return compile_policy(parse_policy(POLICY, "runloop-kvm.toml"))


@pytest.fixture
def loops():
    """The CRunLoops made during the test (the registered factory, observed)."""
    made = []

    def factory(m):
        r = CRunLoop.for_run(m)
        if r is not None:
            made.append(r)
        return r

    unregister_run_loop(CRunLoop.for_run)
    register_run_loop(factory)
    try:
        yield made
    finally:
        unregister_run_loop(factory)
        register_run_loop(CRunLoop.for_run)


def run(policy, vcpus=1, guest=GUEST, keep_exits=True):
    buf = io.StringIO()
    audit = AuditLog(buf)
    with Machine(guest, vcpus=vcpus, keep_exits=keep_exits) as m:
        m.set_policy(policy, audit)
        r = m.run(timeout=30)
    recs = [json.loads(line) for line in buf.getvalue().splitlines()]
    counts = {(s["msr"], s["access"], s["action"], s["result"], s["unlogged"]): s["count"]
              for s in audit.summary()}
    return r, recs, counts


def untimed(recs):
    return [{k: v for k, v in x.items() if k != "time"} for x in recs]


def kept(r):
    return [[(x.index, x.is_write, x.data, x.reason, x.vcpu, x.reply) for x in v.msr_exits]
            for v in r.vcpus]


def test_c_loop_answers_every_policy_exit(cp, loops):
    r, recs, counts = run(EnginePolicy(cp))
    check_enforced(r, recs, {(m, a, res): n for (m, _acc, a, res, _u), n in counts.items()})
    (loop,) = loops
    assert [v.engine_answered for v in loop.vcpus] == [MSR_EXITS]    # none went through Python
    assert [v.handler_answered for v in loop.vcpus] == [0]
    assert r.vcpus[0].exits == MSR_EXITS + PORT_EXITS + 1        # + HLT
    assert r.msr_exit_count == MSR_EXITS == len(r.msr_exits)    # keep_exits lists them


def test_python_handler_path_with_c_loop_off(cp, loops, monkeypatch):
    r, _recs, _ = run(EnginePolicy(cp, c_loop=False))
    (loop,) = loops
    assert [(v.engine_answered, v.handler_answered) for v in loop.vcpus] == [(0, MSR_EXITS)]
    assert len(r.msr_exits) == MSR_EXITS and r.vcpus[0].exits == MSR_EXITS + PORT_EXITS + 1
    monkeypatch.setattr(runloop, "HANDLERS_IN_C", False)    # the Python exit loop alone
    r2, _recs, _ = run(EnginePolicy(cp, c_loop=False))
    assert len(loops) == 1 and kept(r2) == kept(r)


@pytest.mark.parametrize("vcpus", [1, 2])
@pytest.mark.parametrize("mode", ["enforce", "audit"])
def test_c_loop_equals_python_loop(cp, loops, mode, vcpus):
    c_r, c_recs, c_counts = run(EnginePolicy(cp, mode=mode), vcpus)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runloop, "HANDLERS_IN_C", False)         # the Python exit loop alone
        p_r, p_recs, p_counts = run(EnginePolicy(cp, mode=mode, c_loop=False), vcpus)
    (loop,) = loops
    assert sum(v.engine_answered for v in loop.vcpus) == vcpus * MSR_EXITS
    key = lambda x: (x["vcpu"], x["msr"], x["access"])
    assert sorted(untimed(c_recs), key=key) == sorted(untimed(p_recs), key=key)
    assert [x for x in untimed(c_recs) if x["vcpu"] == 0] == [x for x in untimed(p_recs) if x["vcpu"] == 0]
    assert c_counts == p_counts
    assert kept(c_r) == kept(p_r)
    for c, p in zip(c_r.vcpus, p_r.vcpus):
        assert (c.regs.r8, c.regs.r9, c.regs.r10, c.regs.r11, c.regs.r12) == \
            (p.regs.r8, p.regs.r9, p.regs.r10, p.regs.r11, p.regs.r12)
        assert [(f.index, f.rip) for f in c.gp_faults] == [(f.index, f.rip) for f in p.gp_faults]
        assert (c.exits, c.msr_exit_count, c.gp_fault_count) == \
            (p.exits, p.msr_exit_count, p.gp_fault_count)


def test_keep_exits_false_keeps_counts_only(cp, loops):
    r, recs, _ = run(EnginePolicy(cp), keep_exits=False)
    assert r.msr_exits == [] and r.msr_exit_count == MSR_EXITS
    assert r.vcpus[0].exits == MSR_EXITS + PORT_EXITS + 1
    assert len(recs) == len(RECORDS)


def test_two_vcpus_in_the_c_loop(cp, loops):
    r, recs, counts = run(EnginePolicy(cp), vcpus=2)
    for v in r.vcpus:
        g = v.regs
        # the emulated register is shared: both write 0x1111 (allowed) and read it back;
        # 0x174 (SYSENTER_CS) is each vCPU's own MSR, written with 0x10 host-initiated
        assert (g.r8, g.r9, g.r10, g.r11, g.r12) == (0x10001, 0, 0x1111, 0x10, 0)
        assert [f.index for f in v.gp_faults] == [0x40000123, 0x1A0]
        mine = [x for x in recs if x["vcpu"] == v.vcpu]
        assert [(x["msr"], x["access"], x["reason"], x["action"], x["result"]) for x in mine] \
            == RECORDS
        assert all(x["rip"] for x in mine)
    assert counts[("0x186", "write", "ignore", "dropped", 0)] == 2
    assert counts[("0x35", "read", "constant", "read 0x10001", 0)] == 2


def _spinning(m, vcpus=1, answered=500, timeout=60.0):
    """Wait until every vCPU of `m` has made `answered` exits (read live, as metrics do)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = m.exit_counts()
        if len(counts) == vcpus and all(n >= answered for n in counts.values()):
            return True
        time.sleep(0.005)       # polling a condition, not a fixed wait
    return False


@pytest.mark.parametrize("vcpus", [1, 2])
def test_timeout_stops_vcpus_spinning_in_the_c_loop(cp, loops, vcpus):
    with Machine(SPIN, vcpus=vcpus, keep_exits=False) as m:
        m.set_policy(EnginePolicy(cp), AuditLog(io.StringIO()))
        with pytest.raises(TimeoutError):
            m.run(timeout=0.5)
        assert m.vcpus[0].get_regs().rip          # the vCPU is usable afterwards
        assert m.last_result.msr_exit_count == sum(v.answered for v in loops[0].vcpus) > 0


@pytest.mark.parametrize("vcpus", [1, 2])
def test_stop_stops_vcpus_spinning_in_the_c_loop(cp, loops, vcpus):
    with Machine(SPIN, vcpus=vcpus, keep_exits=False) as m:
        audit = AuditLog(io.StringIO())
        m.set_policy(EnginePolicy(cp), audit)
        seen = []

        def stopper():
            seen.append(_spinning(m, vcpus))
            m.stop()

        t = threading.Thread(target=stopper)
        t.start()
        try:
            with pytest.raises(Stopped):
                m.run(timeout=120)
        finally:
            t.join()
        assert seen == [True]
        # every answered read was counted (constant, log = true: rate-limited records)
        (row,) = audit.summary()
        assert row["count"] == m.last_result.msr_exit_count >= 500 * vcpus
        assert row["count"] - row["unlogged"] == audit.written


def test_ctrl_c_stops_a_vcpu_spinning_in_the_c_loop(cp, loops):
    main = threading.get_ident()
    with Machine(SPIN, keep_exits=False) as m:
        m.set_policy(EnginePolicy(cp), AuditLog(io.StringIO()))
        seen = []

        def interrupter():
            seen.append(_spinning(m))
            signal.pthread_kill(main, signal.SIGINT)

        t = threading.Thread(target=interrupter)
        old = signal.signal(signal.SIGINT, signal.default_int_handler)
        t.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                m.run(timeout=120)
        finally:
            t.join()
            signal.signal(signal.SIGINT, old)
        assert seen == [True]


QUIET = """
[policy]
name = "quiet"
default = "allow"
[[rule]]
msr = 0x35
access = "read"
action = "constant"
value = 1
log = false
"""


@pytest.mark.parametrize("where", ["policy in C", "on_msr from C"])
def test_a_signal_landing_between_two_kvm_runs_still_stops_the_run(cp, loops, where):
    """The race the main thread's tick closes: SIGINT's handler runs while the C loop is between
    two KVM_RUNs, so no ioctl returns -EINTR.  _thread.interrupt_main() is exactly that: it trips
    SIGINT's Python handler without interrupting any system call.  Without the tick the guest,
    which never stops exiting, ran on until its timeout; a watchdog stands in for that timeout
    here and records that it had to stop the run.  The policy logs nothing, so no audit drain
    brings the loop back to Python either."""
    import _thread
    quiet = compile_policy(parse_policy(QUIET, "quiet.toml"))
    with Machine(SPIN, keep_exits=False) as m:
        if where == "policy in C":
            m.set_policy(EnginePolicy(quiet), AuditLog(io.StringIO()))
        else:
            m.on_msr(lambda ex: 0)
        seen, watchdog_stopped, ended = [], [], threading.Event()

        def interrupter():
            seen.append(_spinning(m))
            _thread.interrupt_main()
            if not ended.wait(60):
                watchdog_stopped.append(True)
                m.stop()

        t = threading.Thread(target=interrupter)
        old = signal.signal(signal.SIGINT, signal.default_int_handler)
        t.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                m.run()
        finally:
            ended.set()
            t.join()
            signal.signal(signal.SIGINT, old)
        assert seen == [True] and watchdog_stopped == []


UNTIL_TWO = """
again:
    mov ecx, 0x35
    rdmsr
    cmp eax, 2
    jne again
    hlt
"""


@pytest.mark.parametrize("before", ["on_msr", "policy in C"])
@pytest.mark.parametrize("vcpus", [1, 2])
def test_on_msr_replaced_mid_run_takes_over_every_vcpu(loops, vcpus, before):
    """Another thread sets an on_msr handler while every vCPU loops in C on the old handler, or
    on a policy the engine answers (reads answered 1); the new one answers 2 and each guest
    halts.  Before the fix a vCPU looping in the engine's C loop kept the policy, and the run
    ended only at its timeout."""
    require_engine()
    with Machine(UNTIL_TWO, vcpus=vcpus, keep_exits=False) as m:
        busy = threading.Event()
        if before == "on_msr":
            calls = collections.Counter()

            def old(ex):
                calls[ex.vcpu] += 1
                if len(calls) == vcpus and min(calls.values()) >= 100:
                    busy.set()
                return 1

            m.enable_user_space_msr(EXIT_REASON_FILTER)
            m.set_msr_filter(MsrFilter([MsrRange.all(READ, 0x35, 1, allow=False)]))
            m.on_msr(old)
            waiter = lambda: busy.wait(60)     # noqa: E731
        else:
            m.set_policy(EnginePolicy(compile_policy(parse_policy(QUIET, "quiet.toml"))),
                         AuditLog(io.StringIO()))
            waiter = lambda: _spinning(m, vcpus, 100)     # noqa: E731
        t = threading.Thread(target=lambda: waiter() and (busy.set(), m.on_msr(lambda ex: 2)))
        t.start()
        try:
            r = m.run(timeout=60)
        finally:
            t.join()
        assert busy.is_set() and r.regs.rax & 0xffffffff == 2


INTERCEPTED = GUEST.replace("    hlt\n", """    mov ecx, 0x175
    mov eax, 0x4000
    xor edx, edx
    wrmsr                       ; SYSENTER_ESP: the policy lets KVM do it, an interception takes it
    hlt
""")


def test_interception_reaches_python_for_its_msrs(cp, loops):
    seen = []
    with Machine(INTERCEPTED) as m:
        m.set_policy(EnginePolicy(cp), AuditLog(io.StringIO()))
        handle = m.add_interception({0x175}, lambda ex: seen.append((ex.index, ex.data)))
        r = m.run(timeout=30)
        assert m.get_msrs([0x175])[0x175] == 0x4000          # stored host-initiated
        handle.remove()
    assert seen == [(0x175, 0x4000)]
    assert [v.engine_answered for v in loops[0].vcpus] == [MSR_EXITS]   # the policy's, in C
    assert [v.handler_answered for v in loops[0].vcpus] == [0]    # vm.loop dispatched it
    assert r.msr_exit_count == MSR_EXITS + 1 and r.msr_exits[-1].index == 0x175
    assert (r.regs.r8, r.regs.r10, r.regs.r11) == (0x10001, 0x1111, 0x10)


def test_swapping_to_a_python_policy_mid_run_leaves_the_c_loop(cp, loops):
    """set_policy parks the vCPU; it then follows the gate: the Python handlers' exits."""
    with Machine(SPIN, keep_exits=False) as m:
        m.set_policy(EnginePolicy(cp))
        audit = AuditLog(None)

        def swapper():
            try:
                _spinning(m)
                m.set_policy(cp, audit)
                deadline = time.monotonic() + 60
                while sum(r["count"] for r in audit.summary()) < 100 and time.monotonic() < deadline:
                    time.sleep(0.005)       # polling a condition
            finally:
                m.stop()

        t = threading.Thread(target=swapper)
        t.start()
        try:
            with pytest.raises(Stopped):
                m.run(timeout=120)
        finally:
            t.join()
        python_part = sum(r["count"] for r in audit.summary())
        c_part = loops[0].vcpus[0].engine_answered
        assert loops[0].vcpus[0].handler_answered == python_part
        assert python_part >= 100 and c_part >= 500
        assert m.last_result.msr_exit_count == python_part + c_part


def test_audit_failure_stop_ends_a_c_loop_run(cp, loops):
    with Machine(SPIN, keep_exits=False) as m:
        m.set_policy(EnginePolicy(cp), AuditLog("/dev/full"))
        with pytest.raises(AuditFailure):
            m.run(timeout=120)
        assert loops and m.last_result.msr_exit_count > 0


def _scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as f:
        text = f.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("kvmgate_exits_total{"))


@pytest.mark.parametrize("engine", [True, False])
def test_metrics_see_exits_rise_during_a_run(cp, loops, engine):
    from kvmgate.metrics import Metrics
    with Machine(SPIN, keep_exits=False) as m:
        if engine:
            m.set_policy(EnginePolicy(cp))
        else:
            m.enable_user_space_msr(7)
            m.set_msr_filter(cp.filter)
            m.on_msr(lambda ex: 1)
        metrics = Metrics(exits=m.exit_counts)
        port = metrics.serve(0)
        seen = []

        def scraper():
            try:
                _spinning(m, answered=300)
                first = _scrape(port)
                deadline = time.monotonic() + 60
                second = first
                while second <= first and time.monotonic() < deadline:
                    second = _scrape(port)
                seen.extend([first, second])
            finally:
                m.stop()

        t = threading.Thread(target=scraper)
        t.start()
        try:
            with pytest.raises(Stopped):
                m.run(timeout=120)
        finally:
            t.join()
            metrics.close()
        first, second = seen
        assert 0 < first < second <= m.last_result.vcpus[0].exits
        v = loops[0].vcpus[0]
        assert (v.engine_answered > 0, v.handler_answered > 0) == (engine, not engine)


HANDLED = """
    mov ecx, 0x10
    rdmsr                       ; handler returns a value
    mov r8, rax
    mov ecx, 0x11
    rdmsr                       ; handler returns None for a read: #GP
    mov ecx, 0x12
    rdmsr                       ; handler raises InjectGP
    mov ecx, 0x13
    mov eax, 5
    xor edx, edx
    wrmsr                       ; handler returns InjectGP for a write
    mov ecx, 0x14
    wrmsr                       ; a write completed
    mov ecx, 0x15
    rdmsr                       ; a value wider than 64 bits: masked
    mov r9, rax
    mov r10, rdx
    hlt
"""


def _handled(in_c, monkeypatch, boom=False):
    from kvmgate.errors import InjectGP
    from kvmgate.msr.model import READ, WRITE, MsrFilter, MsrRange
    monkeypatch.setattr(runloop, "HANDLERS_IN_C", in_c)
    seen = []

    def handler(ex):
        seen.append((ex.index, ex.is_write, ex.data, ex.reason, ex.vcpu))
        if boom and ex.index == 0x14:
            raise ValueError("handler failed")
        return {0x10: 0x1234, 0x11: None, 0x13: InjectGP, 0x14: None, 0x15: (1 << 70) | 7}.get(
            ex.index) if ex.index != 0x12 else (_ for _ in ()).throw(InjectGP())

    with Machine(HANDLED) as m:
        m.set_msr_filter(MsrFilter([MsrRange.all(READ | WRITE, 0x10, 6, allow=False)]))
        m.enable_user_space_msr(4)
        m.on_msr(handler)
        if boom:
            with pytest.raises(ValueError, match="handler failed"):
                m.run(timeout=30)
            return m.last_result, seen
        return m.run(timeout=30), seen


def test_python_handlers_called_from_c_behave_as_in_the_python_loop(monkeypatch, loops):
    c_r, c_seen = _handled(True, monkeypatch)
    p_r, p_seen = _handled(False, monkeypatch)
    assert len(loops) == 1 and loops[0].vcpus[0].handler_answered == 6
    assert c_seen == p_seen and kept(c_r) == kept(p_r)
    assert [x[-1] for x in kept(c_r)[0]] == [0x1234, "gp", "gp", "gp", None, (1 << 70) | 7]
    assert (c_r.regs.r8, c_r.regs.r9, c_r.regs.r10) == (0x1234, 7, 0) == \
        (p_r.regs.r8, p_r.regs.r9, p_r.regs.r10)
    assert [f.index for f in c_r.gp_faults] == [0x11, 0x12, 0x13] == [f.index for f in p_r.gp_faults]
    assert c_r.vcpus[0].exits == p_r.vcpus[0].exits


def test_a_handler_exception_ends_the_run_from_c_as_from_python(monkeypatch, loops):
    c_r, c_seen = _handled(True, monkeypatch, boom=True)
    p_r, p_seen = _handled(False, monkeypatch, boom=True)
    assert c_seen == p_seen and kept(c_r) == kept(p_r)
    assert c_r.msr_exit_count == p_r.msr_exit_count == 5


def test_without_the_extension_the_python_loop_runs(monkeypatch, loops):
    """As kvmgate installed without a C compiler: no run loop, vm.loop's dispatch over
    Vcpu.run() (the same answers)."""
    monkeypatch.setattr(runloop.binding, "available", lambda: False)
    p_r, p_seen = _handled(True, monkeypatch)
    assert loops == []
    monkeypatch.undo()
    c_r, c_seen = _handled(True, monkeypatch)
    assert len(loops) == 1 and c_seen == p_seen and kept(c_r) == kept(p_r)


def test_info_names_the_exit_path():
    import subprocess
    import sys
    from pathlib import Path

    from kvmgate.engine import available
    out = subprocess.run(check=False, args=[sys.executable, "-m", "kvmgate", "info", "--json"],
                         cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    path = json.loads(out.stdout)["exit_path"]
    assert path.startswith("C run loop") is available()
    assert path.startswith("Python exit loop") is not available()


def test_reopen_while_the_c_drain_writes(cp, loops, tmp_path):
    """logrotate's move + SIGUSR1's reopen() while the C loop logs: every line lands whole in
    the old or the new file, and the two hold every record the log counts as written."""
    loud = compile_policy(parse_policy(POLICY.replace('[policy]\n', '[policy]\naudit_rate = 1e6\n'
                                                      'audit_burst = 1000000\n'), "loud.toml"))
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(str(path), rate=1e6, burst=1000000)

    def lines(p):
        return p.read_text().splitlines() if p.exists() else []

    with Machine(SPIN, keep_exits=False) as m:
        m.set_policy(EnginePolicy(loud), audit)

        def rotator():
            try:
                deadline = time.monotonic() + 60
                while len(lines(path)) < 50 and time.monotonic() < deadline:
                    time.sleep(0.005)       # polling a condition
                path.rename(tmp_path / "audit.jsonl.1")
                audit.reopen()
                while len(lines(path)) < 50 and time.monotonic() < deadline:
                    time.sleep(0.005)
            finally:
                m.stop()

        t = threading.Thread(target=rotator)
        t.start()
        try:
            with pytest.raises(Stopped):
                m.run(timeout=120)
        finally:
            t.join()
    audit.close()
    old, new = lines(tmp_path / "audit.jsonl.1"), lines(path)
    assert len(old) >= 50 and len(new) >= 50
    recs = [json.loads(x) for x in old + new]
    assert len(recs) == audit.written and all(r["msr"] == "0x35" for r in recs)
