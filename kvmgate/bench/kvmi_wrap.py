"""The introspection event round trip in a wrapped QEMU vs a plain policy-answered exit.

The guest (kvmgate.wrap.pvhguest, 1 vCPU): first writes LSTAR with new values until a write
does not stick (the sync point: the tool is in control), then times N WRMSRs of LSTAR (each a
new value) between two RDTSCs.  Paths, one wrapped QEMU run each, interleaved for >= 7 rounds:

* `policy`: `kvmgate wrap --policy` with a rule that answers LSTAR writes in the shim
  (`ignore`: one user-space exit answered by the engine, nothing else);
* `event`:  `kvmgate wrap --introspect connect:unix:...` with a kvmi-v7 tool in its own process
  that controls LSTAR and answers every MSR event CONTINUE with the guest's value (exit, old
  value + registers read by the vCPU, park: a futex wake of the parent's worker for that vCPU,
  the MSR event over the socket, the tool's reply, futex wake, host-initiated KVM_SET_MSRS);
  it reverts the first
  event only, which ends the guest's sync loop.

Figures: median cycles per write, median of the per-round event / policy ratios, load average.
`kvmgate bench wrap-introspect [-n N] [--rounds R] [--json]` prints them.
"""
from __future__ import annotations

import io
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ..wrap import pvhguest
from ..wrap.session import IntrospectOptions, Wrap
from .common import count_arg, emit, load_row, parser, with_load_average
from .kvmi_tool import listening_tool, reap

LSTAR = 0xC0000082
LSTAR_BASE = 0xFFFFFFFF81A00000
ROUNDS = 7
POLICY = f"""[policy]
name = "bench-lstar-ignore"
default = "allow"
log = false

[[rule]]
msr = {LSTAR:#x}
access = "write"
action = "ignore"
log = false
"""

def _cycles(out: Path, what: str) -> int:
    res = pvhguest.parse(out.read_text())
    if "cycles" not in res:
        raise RuntimeError(f"bench guest ({what}) printed no cycle count")
    return res["cycles"]


def run_policy(elf: Path, policy: Path, tmp: Path) -> tuple[int, dict]:
    out = tmp / "policy.out"
    with open(out, "w") as f:
        w = Wrap(pvhguest.qemu_argv(elf, 1), policy=str(policy), stderr=io.StringIO(),
                 vmm_stdout=f, vmm_stderr=subprocess.DEVNULL)
        r = w.run()
    return _cycles(out, "policy"), r.exits


def run_event(elf: Path, tmp: Path) -> tuple[int, dict]:
    out, sock = tmp / "event.out", tmp / "tool.sock"
    if sock.exists():
        sock.unlink()
    tool = subprocess.Popen([sys.executable, "-c", listening_tool(LSTAR),
                             str(sock)], stdout=subprocess.PIPE, text=True)
    try:
        if tool.stdout.readline().strip() != "listening":
            raise RuntimeError("the bench tool did not start")
        opts = IntrospectOptions.parse(f"connect:unix:{sock}", "v7", ["all"], ["all"])
        with open(out, "w") as f:
            w = Wrap(pvhguest.qemu_argv(elf, 1), stderr=io.StringIO(), vmm_stdout=f,
                     vmm_stderr=subprocess.DEVNULL, introspect=opts)
            r = w.run()
        events = w.kvmi.msr_events
    finally:
        reap(tool)
    return _cycles(out, "event"), {**r.exits, "events": events}


def bench(n: int = 2000, rounds: int = ROUNDS) -> dict:
    rounds = max(rounds, ROUNDS)
    with tempfile.TemporaryDirectory(prefix="kvmgate-kvmi-bench-") as d:
        tmp = Path(d)
        elf = pvhguest.build([(LSTAR, 1, LSTAR_BASE)], tmp, vcpus=1, loops=n, write_loop=True,
                             name="lstar-bench")
        pol = tmp / "policy.toml"
        pol.write_text(POLICY)
        run_policy(elf, pol, tmp)                  # warm up
        run_event(elf, tmp)
        rows = []
        for i in range(rounds):
            paths = [("policy", lambda: run_policy(elf, pol, tmp)),
                     ("event", lambda: run_event(elf, tmp))]
            if i % 2:
                paths.reverse()
            row = {}
            for name, fn in paths:
                cycles, exits = fn()
                row[name] = cycles / n
                row[name + "_exits"] = exits
            rows.append(row)
    return {
        "writes": n, "rounds": rounds,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "policy_cycles_per_write": round(statistics.median(r["policy"] for r in rows)),
        "event_cycles_per_write": round(statistics.median(r["event"] for r in rows)),
        "ratio_event_vs_policy": round(statistics.median(r["event"] / r["policy"] for r in rows), 2),
        "ratio_spread": [round(min(r["event"] / r["policy"] for r in rows), 2),
                         round(max(r["event"] / r["policy"] for r in rows), 2)],
        "last_round_exits": {"policy": rows[-1]["policy_exits"], "event": rows[-1]["event_exits"]},
    }


def main(argv: list[str]) -> int:
    ap = parser("wrap-introspect", __doc__, rounds=ROUNDS)
    ap.add_argument("-n", type=count_arg, default=2000, help="LSTAR writes per guest run")
    a = ap.parse_args(argv)
    res = with_load_average(lambda: bench(a.n, a.rounds))
    lo, hi = res["ratio_spread"]
    emit(res, a.json, [
        ("LSTAR writes per guest run", str(res["writes"])),
        ("answered by a policy rule in the shim", f"{res['policy_cycles_per_write']} cycles/write (median)"),
        ("MSR event round trip (kvmi-v7 tool)", f"{res['event_cycles_per_write']} cycles/write (median)"),
        ("ratio event / policy", (f"{res['ratio_event_vs_policy']:.2f}x median of {res['rounds']} "
                                  f"interleaved rounds (spread {lo:.2f}x .. {hi:.2f}x)")),
        load_row(res)])
    return 0
