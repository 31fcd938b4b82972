"""kvmgate.trace against the running kernel: tracefs recording of our own guests, pid
selection, cleanup of the tracefs instance, and replay verdicts vs the live kernel's verdicts."""
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from kvmgate.errors import UserError
from kvmgate.machine import Machine
from kvmgate.msr.model import (DEFAULT_ALLOW, DEFAULT_DENY, EXIT_REASON_FILTER, READ, WRITE,
                               MsrFilter, MsrRange)
from kvmgate.probe import Access, MsrProber
from kvmgate.trace import (Recording, filter_decider, record_tracefs,
                           record_tracefs_to, replay)
from kvmgate.trace.tracefs import INSTANCE_PREFIX, tracefs_root

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parents[2]
GUEST = """
    mov ecx, 0x10
    rdmsr
    mov ecx, 0xc0000080
    rdmsr
    wrmsr
    mov ecx, 0x1b
    rdmsr
    mov ecx, 0x4b564dff
    xor eax, eax
    xor edx, edx
    wrmsr
    hlt
"""
# (index, write, exception) in program order
EXPECTED = [(0x10, False, False), (0xC0000080, False, False), (0xC0000080, True, False),
            (0x1B, False, False), (0x4B564DFF, True, True)]
CHILD_MSR = 0x4B564D50          # + vCPU index: only the child process touches these
CHILD = f"""
import sys
from kvmgate.errors import UserError
from kvmgate.machine import Machine
m = Machine("mov ecx, {CHILD_MSR:#x}\\nadd ecx, edi\\nrdmsr\\nhlt", vcpus=2)
print("ready", flush=True)
sys.stdin.readline()
m.run(timeout=30)
print("done", flush=True)
sys.stdin.readline()
"""


def _keys(trace):
    return [(i, w, e) for _, _, i, w, _, e in trace.events()]


def _is_subsequence(small, big):
    it = iter(big)
    return all(x in it for x in small)


def _our_instances():
    root, _ = tracefs_root()
    return sorted(p.name for p in (root / "instances").glob(f"{INSTANCE_PREFIX}{os.getpid()}*"))


class Child:
    """A second process with a 2-vCPU guest; its vCPU 1 thread is created when it runs."""

    def __init__(self):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)
        assert self.p.stdout.readline().strip() == "ready"
        self.pid = self.p.pid

    def run_guest(self):
        self.p.stdin.write("go\n")
        self.p.stdin.flush()
        assert self.p.stdout.readline().strip() == "done"

    def close(self):
        try:
            self.p.stdin.write("bye\n")
            self.p.stdin.close()
        except BrokenPipeError:
            pass
        self.p.wait(timeout=30)


@pytest.fixture
def child():
    c = Child()
    yield c
    c.close()


def test_record_own_guest_by_pid(child):
    m = Machine(GUEST)
    before = time.monotonic_ns()
    with Recording(pid=os.getpid()) as rec:
        m.run(timeout=10)
        child.run_guest()                        # another VM on the host, not ours
    after = time.monotonic_ns()
    trace = rec.trace
    keys = _keys(trace)
    assert _is_subsequence(EXPECTED, keys), keys
    assert not {i for i, _, _ in keys} & {CHILD_MSR, CHILD_MSR + 1}
    assert trace.meta["clock"] == "mono" and trace.meta["lost_events"] == 0
    assert all(before <= t <= after for t in trace.time_ns.tolist())
    tasks = trace.meta["tasks"]
    assert {int(p) for p in trace.pid.tolist()} <= {int(t) for t in tasks}
    assert all(v["tgid"] == os.getpid() for v in tasks.values())
    assert _our_instances() == []


def test_record_other_process_including_threads_born_later(child):
    mine = Machine(GUEST)
    with Recording(pid=child.pid) as rec:
        child.run_guest()
        mine.run(timeout=10)
    keys = _keys(rec.trace)
    got = {(i, w, e) for i, w, e in keys}
    assert {(CHILD_MSR, False, True), (CHILD_MSR + 1, False, True)} <= got, keys
    assert 0x4B564DFF not in {i for i, _, _ in keys}             # our guest is not selected
    pids = {p for p, i in zip(rec.trace.pid.tolist(), rec.trace.index.tolist())
            if i in (CHILD_MSR, CHILD_MSR + 1)}
    assert len(pids) == 2                                        # vCPU 0 and vCPU 1 threads
    for v in rec.trace.meta["tasks"].values():
        assert v["tgid"] == child.pid


def test_record_all_vms(child):
    m = Machine(GUEST)
    with Recording() as rec:
        m.run(timeout=10)
        child.run_guest()
    idx = {i for i, _, _ in _keys(rec.trace)}
    assert {0x10, 0x4B564DFF, CHILD_MSR, CHILD_MSR + 1} <= idx


def test_record_to_file_streams_row_groups(tmp_path):
    m = Machine(GUEST)
    stop, ready = threading.Event(), threading.Event()
    out = {}
    progress = []

    def rec():
        out["reader"] = record_tracefs_to(tmp_path / "t.parquet", pid=os.getpid(), stop=stop,
                                          ready=ready, row_group_events=2,
                                          progress=lambda n, s: progress.append((n, s)))
    t = threading.Thread(target=rec)
    t.start()
    assert ready.wait(30)
    m.run(timeout=10)
    m.run(timeout=10)
    stop.set()
    t.join(30)
    f = out["reader"]
    assert f.row_groups >= 5 and f.meta["source"] == "tracefs"
    assert not (tmp_path / "t.parquet.parts").exists()
    keys = _keys(f.read())
    assert _is_subsequence(EXPECTED + EXPECTED, keys)
    assert progress and progress[-1][0] == len(keys)


def test_duration_and_global_state_untouched():
    root, _ = tracefs_root()
    enable = (root / "events/kvm/kvm_msr/enable").read_text()
    filt = (root / "events/kvm/kvm_msr/filter").read_text()
    trace = record_tracefs(duration=0.3, pid=os.getpid())
    # the recorder's own clock: it ended because the duration was reached, not before
    assert trace.meta["stopped_by"] == "duration" and trace.meta["duration_s"] >= 0.3
    assert len(trace) == 0
    assert (root / "events/kvm/kvm_msr/enable").read_text() == enable
    assert (root / "events/kvm/kvm_msr/filter").read_text() == filt
    assert _our_instances() == []


def test_instance_removed_on_error_and_interrupt():
    def boom(n, s):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        record_tracefs(duration=5, progress=boom)
    assert _our_instances() == []

    fired = []

    def ctrl_c(n, s):                                          # one Ctrl-C, like a person
        if not fired:
            fired.append(1)
            raise KeyboardInterrupt
    trace = record_tracefs(duration=5, progress=ctrl_c)        # Ctrl-C ends a recording normally
    assert trace.meta["stopped_by"] == "interrupt"
    assert _our_instances() == []


def test_unknown_pid_is_a_user_error():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with pytest.raises(UserError, match=str(dead.pid)):
        record_tracefs(duration=0, pid=dead.pid)
    assert _our_instances() == []


def test_stale_instance_of_dead_process_is_swept():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root, _ = tracefs_root()
    stale = root / "instances" / f"{INSTANCE_PREFIX}{dead.pid}"
    stale.mkdir()
    try:
        record_tracefs(duration=0)
        assert not stale.exists()
    finally:
        if stale.exists():
            stale.rmdir()


def test_event_filter_is_applied():
    m = Machine(GUEST)
    with Recording(pid=os.getpid(), event_filter="ecx == 0xc0000080") as rec:
        m.run(timeout=10)
    assert _keys(rec.trace) == [(0xC0000080, False, False), (0xC0000080, True, False)]


# ---- replay vs the live kernel

ACCESSES = [Access(0x10), Access(0x1B), Access(0xC0000080), Access(0xC0000080, WRITE, 0x500),
            Access(0x3B), Access(0x3B, WRITE, 0), Access(0x48), Access(0x808), Access(0x808, WRITE, 0),
            Access(0xC0000100), Access(0xC0000100, WRITE, 0x1000), Access(0xC0000082),
            Access(0x4B564DFF), Access(0x4B564DFF, WRITE, 7), Access(0x6E0), Access(0x174),
            Access(0x174, WRITE, 0x10)]
MSRS = sorted({a.index for a in ACCESSES})


@pytest.fixture(scope="module")
def prober():
    p = MsrProber()
    yield p
    p.close()


@pytest.fixture(scope="module")
def recorded(prober):
    """The accesses recorded once, with no filter and no user-space exits: all reach the tracepoint."""
    with Recording(pid=os.getpid()) as rec:
        prober.run(ACCESSES, None, 0)
    return rec.trace


def test_recorded_trace_has_every_access(recorded):
    got = {(i, w) for i, w, _ in _keys(recorded)}
    assert {(a.index, a.access == WRITE) for a in ACCESSES} <= got


def _live_verdicts(prober, flt):
    obs = prober.run(ACCESSES, flt, EXIT_REASON_FILTER)
    return {(a.index, a.access == WRITE): "deny" if o.fate == "exit" and o.reason == EXIT_REASON_FILTER
            else "allow" for a, o in zip(ACCESSES, obs)}


def _check(prober, recorded, flt):
    rep = replay(recorded, filter_decider(flt))
    predicted = {(r.index, r.write): r.verdict() for r in rep.rows
                 if (r.index, r.write) in {(a.index, a.access == WRITE) for a in ACCESSES}}
    assert predicted == _live_verdicts(prober, flt)


def test_replay_matches_kernel_fixed_filters(prober, recorded):
    for flt in [MsrFilter(),
                MsrFilter([MsrRange.all(READ | WRITE, 0, 0x2000, False)]),
                MsrFilter([MsrRange.all(WRITE, 0xC0000000, 0x200, False),
                           MsrRange.all(READ, 0, 0x900, True)], DEFAULT_DENY),
                MsrFilter([MsrRange.all(READ | WRITE, 0x800, 0x100, False)], DEFAULT_DENY)]:
        _check(prober, recorded, flt)


bases = st.sampled_from([0, 0x10, 0x3B, 0x174, 0x6E0, 0x800, 0xC0000000, 0xC0000080, 0x4B564D00,
                         0x4B564DFF, 0xFFFFFF00])
ranges = st.builds(lambda f, b, bits: MsrRange.from_bits(f, b, bits),
                   st.sampled_from([READ, WRITE, READ | WRITE]), bases,
                   st.lists(st.booleans(), min_size=1, max_size=300))


@settings(max_examples=25, deadline=None)
@given(rs=st.lists(ranges, min_size=1, max_size=16), deny=st.booleans(), seed=st.integers(0, 99))
def test_replay_matches_kernel_random_filters(prober, recorded, rs, deny, seed):
    random.Random(seed).shuffle(rs)
    _check(prober, recorded, MsrFilter(rs, DEFAULT_DENY if deny else DEFAULT_ALLOW))
