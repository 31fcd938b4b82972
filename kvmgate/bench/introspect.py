"""Introspection event round trip vs a plain user-space MSR exit, on the running kernel.

`bench_events(n)`: the same guest (n WRMSRs of LSTAR, each a new value) on one Machine per path:
  * `native`  - no filter: KVM handles every write (no exit),
  * `exit`    - a FILTER deny on LSTAR writes and an `m.on_msr` handler storing the value with
                KVM_SET_MSRS (one user-space exit per write: the baseline; the interception
                path stores the same way); `exit_bare`: the handler only returns (write dropped),
  * `event`   - introspection, v12: a tool in its own process (a minimal responder) controls
                LSTAR with the MSR event enabled and answers CONTINUE (exit + the owner's
                KVM_GET_MSRS, registers from kvm_run.s + event message + reply, read by the
                vCPU thread itself + KVM_SET_MSRS; docs/introspection.md §5), on the C event
                path when the C engine is built (csrc/kvmi_event.h: no Python per event),
  * `event_py` - the same on the Python event path (fast_events.ENABLED = False),
  * `event_v7` - `event` in the kvmi-v7 (libkvmi) ABI,
  * `event_sleep` - `event` with the vCPU sleeping for the reply at once (no polling first:
                kvmgate.introspection.inbox.POLL_NS = 0 while it is set up and runs),
  * `quiet`   - LSTAR controlled but the MSR event not enabled: the exit, no message,
  * the C floor (exit_loop.c, no Python on either side): `c_exit` - the plain exit that stores
                the value (KVM_SET_MSRS) in a C loop; `c_event` - the same plus what an event
                costs the kernel and the sockets: KVM_GET_MSRS, a 584-byte message to a C
                responder in a child process and its 32-byte reply, read after polling as the
                `event` path does; `c_event_sleep` - without polling.
                `floor_ratio` (c_event / c_exit) is the least an event can cost on this host.
Every path runs once per round, the paths interleaved, for `rounds` (>= 7) rounds after a
warm-up; each figure is the median per-write time, and `ratio` the median of the per-round
event / exit ratios (`ratio_c`: event / c_exit, against the C loop's plain exit).  The load
average is reported with them.  `c_path` says whether `event` ran on the C event path.
`kvmgate bench introspect [-n N] [--rounds R] [--pin-cpu C] [--json]` prints it; with
--pin-cpu every path (the vCPU threads and the tools' processes) runs on CPU C only, which shows
what the round trip costs without cross-CPU wake-ups (reported as pinned: not the default).
"""
from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..machine import Machine
from ..msr.model import EXIT_REASON_FILTER, WRITE, MsrFilter, MsrRange
from ..introspection import fast_events, inbox
from ..introspection.abi import V7, V12, Dialect
from ..introspection.machine_backend import attach
from .common import count_arg, cpu_arg, emit, load_row, parser, with_load_average
from .cbaseline import c_loop
from .kvmi_tool import reap

LSTAR = 0xC0000082
ROUNDS = 7


def lstar_guest(n: int) -> str:
    """n WRMSRs of LSTAR with the values n..1 (each differs from the previous), then HLT."""
    return f"""
    mov ebx, {n}
    mov ecx, {LSTAR:#x}
    xor edx, edx
again:
    mov eax, ebx
    wrmsr
    dec ebx
    jnz again
    hlt"""


# The tools run in their own process (as a real tool would: with a thread of ours it would
# also compete for this process's GIL).  Both are the same minimal responder, in the v12 or the
# kvmi-v7 (libkvmi) dialect: enable the MSR event (argv[2] == "1") and control LSTAR on vCPU 0,
# then answer every event CONTINUE with the guest's value.
#   v12: CONTROL_EVENTS 5 / CONTROL_MSR 25; event = message 1 (event header, vCPU header, state,
#        payload); reply = message 1.
#   v7:  CONTROL_EVENTS 9 / CONTROL_MSR 11; event = message 1 (kvmi_event, payload); reply =
#        message 0.
_TOOL = """
import socket, struct, sys
s = socket.socket(fileno=int(sys.argv[1]))
f = s.makefile("rb")
V7 = sys.argv[3] == "v7"
CONTROL_EVENTS, CONTROL_MSR, MSR_EVENT = (9, 11, 2) if V7 else (5, 25, 15)
REPLY_ID, VCPU_AT, NEW_AT = (0, 2, 544 + 16) if V7 else (1, 10, 8 + 544 + 16)
def request(mid, body):
    s.sendall(struct.pack("=HHI", mid, len(body), 1) + body)
    h = f.read(8); size = struct.unpack("=HHI", h)[1]; err = struct.unpack_from("=i", f.read(size))[0]
    assert err == 0, err
vcpu0 = struct.pack("=HHI", 0, 0, 0)
if sys.argv[2] == "1":
    request(CONTROL_EVENTS, vcpu0 + struct.pack("=HBBI", MSR_EVENT, 1, 0, 0))
request(CONTROL_MSR, vcpu0 + struct.pack("=BBHI", 1, 0, 0, {lstar}))
sys.stdout.write("ready\\n"); sys.stdout.flush()
head, reply = struct.Struct("=HHI"), struct.Struct("=HHIHHIBBHIQ")
while True:
    h = f.read(8)
    if len(h) < 8:
        break
    mid, size, seq = head.unpack(h)
    body = f.read(size)
    vcpu = struct.unpack_from("=H", body, VCPU_AT)[0]
    new = struct.unpack_from("=Q", body, NEW_AT)[0]          # the MSR event's new_value
    s.sendall(reply.pack(REPLY_ID, 24, seq, vcpu, 0, 0, 0, MSR_EVENT, 0, 0, new))
"""


class _Path:
    """One Machine set up for one path; `run()` is one timed run (seconds per write)."""

    def __init__(self, stack: contextlib.ExitStack, n: int):
        self.n = n
        self.m = stack.enter_context(Machine(lstar_guest(n)))
        self.exits = 0
        self.poll_ns = inbox.POLL_NS

    def run(self) -> float:
        saved, inbox.POLL_NS = inbox.POLL_NS, self.poll_ns
        try:
            t = time.perf_counter()
            r = self.m.run(timeout=120)
            elapsed = time.perf_counter() - t
        finally:
            inbox.POLL_NS = saved
        self.exits = len(r.msr_exits)
        return elapsed / self.n


def _plain_exit(stack, n: int, store: bool) -> _Path:
    path = _Path(stack, n)
    m = path.m
    m.set_msr_filter(MsrFilter([MsrRange.all(WRITE, LSTAR, 1, allow=False)]))
    m.enable_user_space_msr(EXIT_REASON_FILTER)
    vcpu = m.vcpus[0]

    @m.on_msr
    def handler(ex):
        if store:                     # store the guest's value, as the event path does
            vcpu.set_msrs({ex.index: ex.data})
        return None

    return path


def _introspected(stack, n: int, enable_event: bool, abi: Dialect, fast: bool = True,
                  poll_ns: int | None = None) -> _Path:
    path = _Path(stack, n)
    if poll_ns is not None:
        path.poll_ns = poll_ns
    intro = attach(path.m)
    a, b = socket.socketpair()
    saved = fast_events.ENABLED, inbox.POLL_NS
    fast_events.ENABLED, inbox.POLL_NS = fast, path.poll_ns   # the session's port is made here
    try:
        intro.hook(a, b"kvmgate-bench-00", commands=[-1], events=[-1], abi=abi)
    finally:
        fast_events.ENABLED, inbox.POLL_NS = saved
    a.close()
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = _TOOL.format(lstar=LSTAR)
    try:
        proc = subprocess.Popen([sys.executable, "-c", script, str(b.fileno()),
                                 "1" if enable_event else "0", abi.name], pass_fds=[b.fileno()],
                                stdout=subprocess.PIPE, text=True, env=env)
    except BaseException:
        intro.unhook()
        raise
    finally:
        b.close()
    stack.callback(reap, proc)
    stack.callback(intro.unhook)       # runs first (LIFO): the tool sees EOF and ends at once
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("the bench tool did not start")
    path.backend = intro.backend
    path.port = intro.server.port
    return path


EVENT_SIZE, REPLY_SIZE = 584, 32     # a v12 MSR event message and its CONTINUE reply


class _CPath:
    """The C floor: one vCPU set up by a Machine (LSTAR writes exit), run by exit_loop.c's
    event loop; `sock` talks to a child process running its echo (None: store only)."""

    def __init__(self, stack: contextlib.ExitStack, n: int, event: bool, poll_ns: int):
        self.n, self.poll_ns, self.exits = n, poll_ns, 0
        self.lib = c_loop()
        m = self.m = stack.enter_context(Machine(lstar_guest(n)))
        m.set_msr_filter(MsrFilter([MsrRange.all(WRITE, LSTAR, 1, allow=False)]))
        m.enable_user_space_msr(EXIT_REASON_FILTER)
        self.sock = None
        if event:
            a, b = socket.socketpair()
            pid = os.fork()
            if pid == 0:                  # the responder: C only, then out
                try:
                    a.close()
                    self.lib.kvmgate_bench_echo(b.fileno(), EVENT_SIZE, REPLY_SIZE)
                finally:
                    os._exit(0)
            b.close()
            self.sock = a
            stack.callback(os.waitpid, pid, 0)
            stack.callback(a.close)       # runs first: the responder sees EOF and ends

    def run(self) -> float:
        self.m.reset()
        (fd, addr), = self.m.vcpu_fds()
        sock = -1 if self.sock is None else self.sock.fileno()
        t = time.perf_counter()
        got = self.lib.kvmgate_bench_event_loop(fd, addr, sock, EVENT_SIZE, REPLY_SIZE, self.poll_ns)
        elapsed = time.perf_counter() - t
        if got != self.n:
            raise RuntimeError(f"the C floor made {got} exits, expected {self.n}")
        self.exits = got
        return elapsed / self.n


def bench_events(n: int = 2000, rounds: int = ROUNDS, pin_cpu: int | None = None) -> dict:
    """Per-write cost (microseconds, median of `rounds` interleaved rounds) of each path, and
    the median per-round event / plain-exit ratio.  `pin_cpu`: run everything on that CPU."""
    if pin_cpu is None:
        return _bench_events(n, rounds)
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {pin_cpu})      # this thread: the vCPU's, and the tools inherit it
    try:
        return dict(_bench_events(n, rounds), pinned_cpu=pin_cpu)
    finally:
        os.sched_setaffinity(0, saved)


def _bench_events(n: int, rounds: int) -> dict:
    with contextlib.ExitStack() as stack:
        paths = {
            "native": _Path(stack, n),
            "exit": _plain_exit(stack, n, store=True),
            "exit_bare": _plain_exit(stack, n, store=False),
            "event": _introspected(stack, n, True, V12),
            "event_py": _introspected(stack, n, True, V12, fast=False),
            "event_v7": _introspected(stack, n, True, V7),
            "event_sleep": _introspected(stack, n, True, V12, poll_ns=0),
            "quiet": _introspected(stack, n, False, V12),
            "c_exit": _CPath(stack, n, False, 0),
            "c_event": _CPath(stack, n, True, inbox.POLL_NS),
            "c_event_sleep": _CPath(stack, n, True, 0),
        }
        for p in paths.values():
            p.run()                                   # warm up
        before = {k: p.backend.msr_events for k, p in paths.items() if hasattr(p, "backend")}
        times: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(rounds):
            for k, p in paths.items():
                times[k].append(p.run())
        events = {k: (p.backend.msr_events - before[k]) // rounds
                  for k, p in paths.items() if k in before}
        exits = {k: paths[k].exits
                 for k in ("exit", "event", "event_py", "event_v7", "event_sleep", "quiet")}
        c_path = paths["event"].port is not None and paths["event"].port.events > 0
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "writes": n,
        "rounds": rounds,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        **{f"{k}_us": round(v * 1e6, 3) for k, v in med.items()},
        "c_path": c_path,
        "ratio": round(statistics.median(e / x for e, x in zip(times["event"], times["exit"])), 2),
        "ratio_c": round(statistics.median(e / x for e, x in zip(times["event"],
                                                                  times["c_exit"])), 2),
        "ratio_py": round(statistics.median(e / x for e, x in zip(times["event_py"],
                                                                   times["exit"])), 2),
        "ratio_v7": round(statistics.median(e / x for e, x in zip(times["event_v7"],
                                                                    times["exit"])), 2),
        "ratio_sleep": round(statistics.median(e / x for e, x in zip(times["event_sleep"],
                                                                       times["exit"])), 2),
        "quiet_ratio": round(statistics.median(q / x for q, x in zip(times["quiet"],
                                                                      times["exit"])), 2),
        "floor_ratio": round(statistics.median(e / x for e, x in zip(times["c_event"],
                                                                      times["c_exit"])), 2),
        "floor_sleep_ratio": round(statistics.median(e / x for e, x in zip(times["c_event_sleep"],
                                                                            times["c_exit"])), 2),
        "exits": exits,
        "events": events,
    }


def main(argv: list[str]) -> int:
    ap = parser("introspect", __doc__, rounds=ROUNDS)
    ap.add_argument("-n", type=count_arg, default=2000, help="LSTAR writes per run")
    ap.add_argument("--pin-cpu", type=cpu_arg, metavar="CPU",
                    help="run the vCPUs and the tools on this CPU only (not the default)")
    a = ap.parse_args(argv)
    res = with_load_average(lambda: bench_events(a.n, a.rounds, a.pin_cpu))
    us = lambda k: f"{res[k + '_us']:.2f} us/write (median)"  # noqa: E731
    emit(res, a.json, [
        ("LSTAR writes per run", str(res["writes"])),
        ("native (no exit)", us("native")),
        ("user-space exit, value stored", us("exit")),
        ("user-space exit, write dropped", us("exit_bare")),
        ("MSR event round trip (v12)", us("event") + (" (C event path)" if res["c_path"]
                                                       else " (Python: no C engine)")),
        ("MSR event, Python path (v12)", us("event_py")),
        ("MSR event round trip (kvmi-v7)", us("event_v7")),
        ("MSR event, no polling (v12)", us("event_sleep")),
        ("controlled, event off", us("quiet")),
        ("ratio event / exit", (f"{res['ratio']:.2f}x (v7 {res['ratio_v7']:.2f}x, no polling "
                                f"{res['ratio_sleep']:.2f}x, event off {res['quiet_ratio']:.2f}x, "
                                f"Python path {res['ratio_py']:.2f}x), "
                                f"median of {res['rounds']} interleaved rounds")),
        ("ratio event / C loop's exit", f"{res['ratio_c']:.2f}x"),
        ("C floor: exit storing the value", us("c_exit")),
        ("C floor: event round trip", us("c_event")),
        ("C floor: event, no polling", us("c_event_sleep")),
        ("C floor ratio event / exit", (f"{res['floor_ratio']:.2f}x (no polling "
                                        f"{res['floor_sleep_ratio']:.2f}x): the least an event "
                                        "costs here")),
        ("CPUs", f"pinned to CPU {a.pin_cpu}" if a.pin_cpu is not None else "any (not pinned)"),
        load_row(res)])
    return 0
