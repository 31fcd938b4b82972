"""The C MSR event path (csrc/kvmi_event.h, kvmgate/introspection/fast_events.py) on the running
kernel, against the Python event path as the second implementation: the same guest and the same
tool in both modes must see the same bytes on the wire and leave the same guest state; and
every case the C path hands to Python (a command before the reply, CRASH, EOF, the event
timeout, a stop while the vCPU waits, a short reply, an event turned off mid-run) ends as the
Python path ends.

The tool is raw bytes over a socketpair (no kvmgate codec), in the v12 and the kvmi-v7 dialect.
Every wait is bounded (run timeouts, thread joins with a deadline).
"""
import socket
import struct
import threading

import pytest

from kvmgate import Machine
from kvmgate.engine import binding
from kvmgate.exits import Stopped
from kvmgate.guest import DATA
from kvmgate.introspection import fast_events
from kvmgate.introspection.abi import V7, V12
from kvmgate.introspection.machine_backend import IntrospectionCrash, attach

pytestmark = pytest.mark.kvm

LSTAR = 0xC0000082
N = 8
T = 30.0
HDR = struct.Struct("=HHI")
# per dialect: CONTROL_EVENTS id, CONTROL_MSR id, MSR event id on the wire, reply message id,
# offset of the event's vCPU in the message body, offset of new_value in the body
DIALECTS = {
    "v12": (V12, 5, 25, 15, 1, 10, 8 + 544 + 16),
    "v7": (V7, 9, 11, 2, 0, 2, 544 + 16),
}
CONTINUE, RETRY, CRASH = 0, 1, 2

# N writes of LSTAR (values N<<12 .. 1<<12), each read back into DATA[i].
GUEST = f"""
    mov ecx, {LSTAR:#x}
    mov rsi, {DATA:#x}
    mov ebx, {N}
again:
    mov eax, ebx
    shl eax, 12
    xor edx, edx
    wrmsr
    rdmsr
    mov [rsi], rax
    add rsi, 8
    dec ebx
    jnz again
    hlt"""


def c_path_available():
    return binding.available()


class Tool(threading.Thread):
    """A raw-bytes tool: enables the MSR event and controls LSTAR on vCPU 0, then for each
    event i calls on_event(tool, i, seq, vcpu, old, new) -> bytes to send (b"": none, None:
    close the socket).  Records every event message (header + body)."""

    def __init__(self, sock, dialect, on_event):
        super().__init__(daemon=True, name="test-tool")
        (self.abi, self.ctl_events, self.ctl_msr, self.wire, self.reply_id,
         self.vcpu_at, self.new_at) = DIALECTS[dialect]
        self.sock, self.on_event = sock, on_event
        self.f = sock.makefile("rb")
        self.events: list[bytes] = []
        self.seq = 100
        self.error = None
        self.ready = threading.Event()

    def request(self, mid, body):
        self.seq += 1
        self.sock.sendall(HDR.pack(mid, len(body), self.seq) + body)
        h = self.f.read(8)
        size = HDR.unpack(h)[1]
        return struct.unpack_from("=i", self.f.read(size))[0]

    def reply(self, seq, vcpu, action, value, size=24):
        body = struct.pack("=HHIBBHIQ", vcpu, 0, 0, action, self.wire, 0, 0, value)[:size]
        return HDR.pack(self.reply_id, size, seq) + body

    def run(self):
        try:
            vcpu0 = HDR.pack(0, 0, 0)
            assert self.request(self.ctl_events, vcpu0 + struct.pack("=HBBI", self.wire, 1, 0, 0)) == 0
            assert self.request(self.ctl_msr, vcpu0 + struct.pack("=BBHI", 1, 0, 0, LSTAR)) == 0
            self.ready.set()
            i = 0
            while True:
                h = self.f.read(8)
                if len(h) < 8:
                    return
                mid, size, seq = HDR.unpack(h)
                body = self.f.read(size)
                self.events.append(h + body)
                vcpu = struct.unpack_from("=H", body, self.vcpu_at)[0]
                old, new = struct.unpack_from("=QQ", body, self.new_at - 8)
                out = self.on_event(self, i, seq, vcpu, old, new)
                i += 1
                if out is None:         # the makefile holds the fd open too
                    self.f.close()
                    self.sock.close()
                    return
                if out:
                    self.sock.sendall(out)
        except Exception as exc:        # reported by the test
            self.error = exc
            self.ready.set()


def run_guest(dialect, on_event, fast, monkeypatch, event_timeout=None, stop_at=None):
    """One guest run with the tool; (machine, backend, tool, run result or exception, port)."""
    monkeypatch.setattr(fast_events, "ENABLED", fast)
    with Machine(GUEST) as m:
        intro = attach(m, event_timeout=event_timeout)
        a, b = socket.socketpair()
        abi = DIALECTS[dialect][0]
        intro.hook(a, b"kvmgate-c-events", commands=[-1], events=[-1], abi=abi)
        a.close()
        b.settimeout(T)
        tool = Tool(b, dialect, on_event)
        tool.start()
        assert tool.ready.wait(T) and tool.error is None, tool.error
        port = intro.server.port
        assert (port is not None) == (fast and c_path_available())
        if stop_at is not None:
            stop_at.m = m
        try:
            outcome = m.run(timeout=T)
        except Exception as exc:       # compared by the test
            outcome = exc
        values = struct.unpack(f"={N}Q", m.read_mem(DATA, 8 * N))
        backend = intro.backend
        events, writes = backend.msr_events, backend.msr_writes
        intro.unhook()
        tool.join(T)
        assert not tool.is_alive()
        b.close()
        return values, outcome, tool, port, events, writes


def both(dialect, on_event, monkeypatch, **kw):
    if not c_path_available():
        pytest.skip("the C engine is not built")
    c = run_guest(dialect, on_event, True, monkeypatch, **kw)
    py = run_guest(dialect, on_event, False, monkeypatch, **kw)
    return c, py


def answers(tool, i, seq, vcpu, old, new):
    """CONTINUE with new + 0x10 on even events, RETRY on odd ones."""
    if i % 2:
        return tool.reply(seq, vcpu, RETRY, 0xDEAD000)
    return tool.reply(seq, vcpu, CONTINUE, new + 0x10)


@pytest.mark.parametrize("dialect", ["v12", "v7"])
def test_c_path_sends_the_same_bytes_and_stores_the_same_values(dialect, monkeypatch):
    c, py = both(dialect, answers, monkeypatch)
    (cv, cout, ctool, port, cev, cwr), (pv, pout, ptool, _, pev, pwr) = c, py
    assert not isinstance(cout, Exception) and not isinstance(pout, Exception)
    # by hand: the writes are N<<12 .. 1<<12; even events CONTINUE with +0x10, odd ones RETRY
    # (LSTAR keeps the previous value)
    want, prev = [], 0
    for i in range(N):
        new = (N - i) << 12
        prev = new + 0x10 if i % 2 == 0 else prev
        want.append(prev)
    assert list(cv) == list(pv) == want
    assert ctool.events == ptool.events and len(ctool.events) == N
    assert cev == pev == N and cwr == pwr == N
    # the first event goes through Python (KVM copies the registers into kvm_run from then
    # on), every later one through C
    assert port.events == N - 1 and port.writes == N - 1


@pytest.mark.parametrize("dialect", ["v12", "v7"])
def test_a_command_before_the_reply_is_handed_to_python(dialect, monkeypatch):
    def on_event(tool, i, seq, vcpu, old, new):
        # GET_VERSION (message 2 in both dialects) before every reply: the vCPU waiting in C
        # reads the command's first bytes and hands them to Python, which answers it
        err = tool.request(2, b"")
        assert err == 0
        return tool.reply(seq, vcpu, CONTINUE, new + 1)

    (cv, cout, ctool, port, cev, _), (pv, pout, ptool, _, pev, _) = both(dialect, on_event,
                                                                          monkeypatch)
    assert ctool.error is None and ptool.error is None
    assert list(cv) == list(pv) == [((N - i) << 12) + 1 for i in range(N)]
    assert ctool.events == ptool.events and cev == pev == N
    assert port.events == N - 1           # sent in C, finished in Python


@pytest.mark.parametrize("dialect", ["v12", "v7"])
def test_crash_reply_stops_the_run_on_both_paths(dialect, monkeypatch):
    def on_event(tool, i, seq, vcpu, old, new):
        return tool.reply(seq, vcpu, CRASH if i == 3 else CONTINUE, new)

    c, py = both(dialect, on_event, monkeypatch)
    for values, outcome, *_ in (c, py):
        assert isinstance(outcome, IntrospectionCrash)
        assert list(values[:3]) == [(N - i) << 12 for i in range(3)] and values[3] == 0
    assert c[3].events == 3                 # events 1..3 sent in C, the CRASH handed over


@pytest.mark.parametrize("dialect", ["v12", "v7"])
def test_tool_closing_while_the_vcpu_waits_lets_the_guest_go_on(dialect, monkeypatch):
    def on_event(tool, i, seq, vcpu, old, new):
        return None if i == 2 else tool.reply(seq, vcpu, CONTINUE, new + 1)

    (cv, cout, ctool, *_), (pv, pout, *_) = both(dialect, on_event, monkeypatch)
    assert not isinstance(cout, Exception) and not isinstance(pout, Exception)
    # events 0 and 1 answered (+1), from event 2 on the guest's own values
    want = [((N - i) << 12) + (1 if i < 2 else 0) for i in range(N)]
    assert list(cv) == list(pv) == want


def test_event_timeout_while_c_waits_closes_the_session(monkeypatch):
    closed = []

    def on_event(tool, i, seq, vcpu, old, new):
        return b"" if i == 2 else tool.reply(seq, vcpu, CONTINUE, new + 1)   # no reply to #2

    for fast in (True, False):
        # 2 s: the answered events' replies (a thread of this process) must never be late,
        # however loaded the machine
        values, outcome, tool, port, events, _ = run_guest("v12", on_event, fast, monkeypatch,
                                                           event_timeout=2.0)
        assert not isinstance(outcome, Exception), outcome
        want = [((N - i) << 12) + (1 if i < 2 else 0) for i in range(N)]
        assert list(values) == want and events == 3
        closed.append(port)
    assert closed[0] is not None and closed[0].events == 2


class StopAt:
    m = None


def test_stop_while_the_vcpu_waits_for_the_reply(monkeypatch):
    """Machine.stop() while vCPU 0 waits for the reply to event 2 (in C: the kick's
    immediate_exit hands the wait to Python, where the vCPU counts as parked): the reply still
    completes the write, then the run ends with Stopped, as on the Python path (which waits for
    the tool too)."""
    stop_at = StopAt()

    def on_event(tool, i, seq, vcpu, old, new):
        if i == 2:
            stop_at.m.stop()
        return tool.reply(seq, vcpu, CONTINUE, new + 1)

    for fast in (True, False):
        values, outcome, tool, port, events, _ = run_guest("v12", on_event, fast, monkeypatch,
                                                           stop_at=stop_at)
        assert isinstance(outcome, Stopped), outcome
        # the third write completes, but the guest is stopped before it stores what it reads
        assert list(values[:3]) == [(N << 12) + 1, ((N - 1) << 12) + 1, 0] and events == 3


@pytest.mark.parametrize("size", [0, 8, 16])
def test_short_reply_reads_as_zero_on_both_paths(size, monkeypatch):
    """A reply shorter than its payload reads as zero (the kernel's rule): C hands it over."""
    def on_event(tool, i, seq, vcpu, old, new):
        if i == 4:
            return tool.reply(seq, vcpu, CONTINUE, 0, size=8 + size) if size >= 8 else \
                HDR.pack(tool.reply_id, size, seq)
        return tool.reply(seq, vcpu, CONTINUE, new)

    c, py = both("v12", on_event, monkeypatch)
    assert [type(x[1]) for x in (c, py)] == [type(c[1])] * 2
    assert list(c[0]) == list(py[0])
    if size == 16:            # the whole common part, no new_val: LSTAR := 0
        assert c[0][4] == 0 and c[0][5] == (N - 5) << 12


def test_event_turned_off_mid_run_is_off_for_c_too(monkeypatch):
    def on_event(tool, i, seq, vcpu, old, new):
        if i == 3:    # CONTROL_EVENTS(MSR, off) before the reply: no event after this one
            vcpu0 = HDR.pack(0, 0, 0)
            assert tool.request(tool.ctl_events,
                                vcpu0 + struct.pack("=HBBI", tool.wire, 0, 0, 0)) == 0
        return tool.reply(seq, vcpu, CONTINUE, new + 1)

    (cv, _, ctool, port, cev, cwr), (pv, _, ptool, _, pev, pwr) = both("v12", on_event,
                                                                        monkeypatch)
    want = [((N - i) << 12) + (1 if i <= 3 else 0) for i in range(N)]
    assert list(cv) == list(pv) == want
    assert len(ctool.events) == len(ptool.events) == 4 and cev == pev == 4
    assert cwr == pwr == N


def test_the_token_is_dead_once_the_session_is_over(monkeypatch):
    if not c_path_available():
        pytest.skip("the C engine is not built")
    values, outcome, tool, port, *_ = run_guest("v12", answers, True, monkeypatch)
    native = binding.native()
    for _ in range(int(T / 0.01)):
        if port.token == native.TOKEN_DEAD:
            break
        threading.Event().wait(0.01)
    assert port.token == native.TOKEN_DEAD
