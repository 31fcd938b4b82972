"""Introspection event round trip vs a plain user-space MSR exit, on the running kernel.

`bench_events(n)`: the same guest (n WRMSRs of LSTAR, each a new value) run
  * `native`  - no filter: KVM handles every write (no exit),
  * `exit`    - a FILTER deny on LSTAR writes and an `m.on_msr` handler storing the value with
                KVM_SET_MSRS (one user-space exit per write: the baseline; the interception
                path stores the same way); `exit_bare`: the handler only returns (write dropped),
  * `event`   - introspection: a tool over a socketpair (in its own process; `event_thread_tool`:
                a thread of ours) controls LSTAR with the MSR event enabled and answers
                CONTINUE (exit + event message + reply + the owner's KVM_GET_MSRS/REGS/SREGS
                for the event's state + KVM_SET_MSRS),
  * `quiet`   - LSTAR controlled but the MSR event not enabled: the exit, no message,
and reports per-write microseconds (best of 3 runs each) and `ratio` = event / exit.
`python -m kvmgate.introspection.bench [N]` prints it as JSON.
"""
from __future__ import annotations

import json
import socket
import sys
import threading
import time

LSTAR = 0xC0000082


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


REPEAT = 3


def _timed_run(m, n: int, repeat: int = REPEAT) -> tuple[float, int]:
    """Best of `repeat` runs (this host's noise is one-sided): seconds per write, exits."""
    best, exits = float("inf"), 0
    for _ in range(repeat):
        t = time.perf_counter()
        r = m.run(timeout=120)
        best = min(best, (time.perf_counter() - t) / n)
        exits = len(r.msr_exits)
    return best, exits


def _native(n: int) -> tuple[float, int]:
    from ..machine import Machine
    with Machine(lstar_guest(n)) as m:
        m.run(timeout=60)                 # warm up
        return _timed_run(m, n)


def _plain_exit(n: int, store: bool = True) -> tuple[float, int]:
    from ..machine import Machine
    from ..msr.model import EXIT_REASON_FILTER, WRITE, MsrFilter, MsrRange
    with Machine(lstar_guest(n)) as m:
        m.set_msr_filter(MsrFilter([MsrRange.all(WRITE, LSTAR, 1, allow=False)]))
        m.enable_user_space_msr(EXIT_REASON_FILTER)
        vcpu = m.vcpus[0]

        @m.on_msr
        def handler(ex):
            if store:                     # store the guest's value, as the event path does
                vcpu.set_msrs({ex.index: ex.data})
            return None

        m.run(timeout=60)
        return _timed_run(m, n)


# The tool of the `event` runs in its own process by default (as a real tool would: with a
# thread of ours it would also compete for this process's GIL).
_TOOL = """
import socket, sys
from kvmgate.introspection import Client, ids
c = Client(socket.socket(fileno=int(sys.argv[1])))
if sys.argv[2] == "1":
    c.vcpu_control_events(0, ids.VCPU_EVENT_MSR, True)
c.control_msr(0, {lstar})
sys.stdout.write("ready\\n"); sys.stdout.flush()
c.serve(on_msr=lambda ev: None)
""".format(lstar=LSTAR)


def _introspected(n: int, enable_event: bool, tool: str = "process") -> tuple[float, int, int]:
    import os
    import subprocess
    from pathlib import Path
    from ..machine import Machine
    from . import ids
    from .client import Client
    from .machine_backend import attach
    with Machine(lstar_guest(n)) as m:
        intro = attach(m)
        a, b = socket.socketpair()
        intro.hook(a, b"kvmgate-bench-00", commands=[-1], events=[-1])
        a.close()
        proc = t = c = None
        try:
            if tool == "process":
                root = str(Path(__file__).resolve().parents[2])
                env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
                proc = subprocess.Popen([sys.executable, "-c", _TOOL, str(b.fileno()),
                                         "1" if enable_event else "0"], pass_fds=[b.fileno()],
                                        stdout=subprocess.PIPE, text=True, env=env)
                b.close()
                if proc.stdout.readline().strip() != "ready":
                    raise RuntimeError("the bench tool did not start")
            else:
                b.settimeout(30)
                c = Client(b)
                if enable_event:
                    c.vcpu_control_events(0, ids.VCPU_EVENT_MSR, True)
                c.control_msr(0, LSTAR, True)
                t = threading.Thread(target=c.serve, kwargs={"on_msr": lambda ev: None},
                                     name="bench-tool", daemon=True)
                t.start()
            m.run(timeout=60)
            before = intro.backend.msr_events
            per, exits = _timed_run(m, n)
            events = (intro.backend.msr_events - before) // REPEAT     # per run
        finally:
            intro.unhook()
            if proc is not None:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if t is not None:
                t.join(5)
                c.close()
        return per, exits, events


def bench_events(n: int = 2000) -> dict:
    """Per-write cost (microseconds) of each path, and event / plain-exit ratio."""
    native, _ = _native(n)
    plain, plain_exits = _plain_exit(n)
    bare, _ = _plain_exit(n, store=False)
    event, event_exits, events = _introspected(n, True)
    event_thread, _, _ = _introspected(n, True, tool="thread")
    quiet, quiet_exits, quiet_events = _introspected(n, False)
    return {
        "writes": n,
        "native_us": round(native * 1e6, 3),
        "exit_us": round(plain * 1e6, 3),
        "exit_bare_us": round(bare * 1e6, 3),
        "event_us": round(event * 1e6, 3),
        "event_thread_tool_us": round(event_thread * 1e6, 3),
        "quiet_us": round(quiet * 1e6, 3),
        "ratio": round(event / plain, 2),
        "quiet_ratio": round(quiet / plain, 2),
        "exits": {"exit": plain_exits, "event": event_exits, "quiet": quiet_exits},
        "events": {"event": events, "quiet": quiet_events},
    }


if __name__ == "__main__":
    print(json.dumps(bench_events(int(sys.argv[1]) if len(sys.argv) > 1 else 2000), indent=2))
