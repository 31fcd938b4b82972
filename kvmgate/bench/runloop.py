"""`kvmgate bench runloop`: the exit paths of Machine against the bare C KVM_RUN loop
(cbaseline) on the same guest and vCPUs, in interleaved rounds (bench.common.paired):

  policy log=false     an EnginePolicy answering every exit (constant, not logged, counted in
                       the audit log's summary): the C run loop (csrc/runloop.c), no Python
                       per exit                                                target <= 1.10x
  policy log=true      the same rule logged (rate limited as configured, records drained and
                       formatted in C)                                         target <= 1.10x
                       (both with the audit log on, to a file)
  on_msr handler       a Python on_msr handler: the Python exit loop          target <= 1.35x
  vCPUs 1/2/4          policy log=false, total exits/s against C loops on as many threads
                                                                               target >= 0.9x
Each row: median per-exit cost of both, the median of per-round ratios with its spread, and
the load average."""
from __future__ import annotations

import os
import sys
import tempfile
import time

from ..audit import AuditLog
from ..engine import EnginePolicy, available, unavailable_reason
from ..policy import compile_policy, parse_policy
from ..vm import Machine
from .cbaseline import c_loop
from .common import BenchError, count_arg, emit, load_row, paired, parser
from .exits import UNKNOWN_MSR, exit_guest, time_c

POLICY = f"""
[policy]
name = "bench-runloop"
default = "allow"
[[rule]]
msr = {UNKNOWN_MSR:#x}
access = "read"
action = "constant"
value = 0
log = {{log}}
"""


def _policy(log: bool):
    return EnginePolicy(compile_policy(parse_policy(POLICY.replace("{log}", "true" if log else "false"),
                                                    "bench-runloop.toml")))


def _time_run(m: Machine) -> float:
    t = time.perf_counter()
    r = m.run(timeout=300)
    dt = time.perf_counter() - t
    return dt / r.msr_exit_count


def _policy_machine(n: int, vcpus: int, log: bool, audit_path: str | None) -> tuple[Machine, AuditLog | None]:
    m = Machine(exit_guest(n), vcpus=vcpus, keep_exits=False)
    audit = AuditLog(audit_path) if audit_path else None
    m.set_policy(_policy(log), audit)
    m.run(timeout=120)               # warm up
    return m, audit


def _row(name: str, res: dict, target: str) -> dict:
    return {"path": name, "us_per_exit": res["measured"] * 1e6, "c_us_per_exit": res["baseline"] * 1e6,
            "ratio": res["ratio"], "ratio_spread": res["ratio_spread"], "rounds": res["rounds"],
            "target": target, "load_average": res["load_average"]}


def bench_runloop(n: int = 20000, rounds: int = 9, vcpu_counts=(1, 2, 4), progress=None) -> list[dict]:
    c_loop()                         # BenchError before anything runs if there is no baseline
    if not available():
        raise BenchError(f"the C run loop needs the C engine: {unavailable_reason()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvmgate-bench-") as tmp:
        for name, log, path in (("policy log=false, audit file", False, os.path.join(tmp, "a0.jsonl")),
                                ("policy log=true, audit file", True, os.path.join(tmp, "a1.jsonl"))):
            m, audit = _policy_machine(n, 1, log, path)
            with m:
                res = paired(rounds, lambda m=m: _time_run(m), lambda m=m: time_c(m, n), progress)
            if audit is not None:
                audit.close()
            rows.append(_row(name, res, "<= 1.10x"))
        with Machine(exit_guest(n), keep_exits=False) as m:
            m.enable_user_space_msr(7)
            m.on_msr(lambda exit: 0 if not exit.is_write else None)
            m.run(timeout=120)
            res = paired(rounds, lambda m=m: _time_run(m), lambda m=m: time_c(m, n), progress)
        rows.append(_row("on_msr Python handler", res, "<= 1.35x"))
    for k in vcpu_counts:
        m, _ = _policy_machine(n, k, False, None)
        with m:
            res = paired(rounds, lambda m=m: _time_run(m), lambda m=m: time_c(m, n), progress)
        row = _row(f"policy log=false, {k} vCPU(s)", res, ">= 0.9x exits/s")
        row.update(vcpus=k, exits_per_s=1 / res["measured"], c_exits_per_s=1 / res["baseline"],
                   throughput_vs_c=1 / res["ratio"])
        rows.append(row)
    return rows


def main(argv: list[str]) -> int:
    ap = parser("runloop", __doc__)
    ap.add_argument("-n", type=count_arg, default=20000, help="MSR exits per vCPU per round")
    ap.add_argument("--vcpus", default="1,2,4", help="vCPU counts for the throughput rows")
    a = ap.parse_args(argv)
    counts = tuple(int(x) for x in a.vcpus.split(",") if x.strip())
    prog = None if a.json else (lambda i, k: print(f"  round {i}/{k}", file=sys.stderr, end="\r"))
    rows = bench_runloop(a.n, a.rounds, counts, prog)
    if prog is not None:
        print(file=sys.stderr)
    if a.json:
        emit({"exits_per_round": a.n, "rows": rows}, True, [])
        return 0
    out = [("MSR exits per vCPU per round", str(a.n))]
    for r in rows:
        lo, hi = r["ratio_spread"]
        if "vcpus" in r:
            text = (f"{r['exits_per_s']:,.0f} exits/s vs C {r['c_exits_per_s']:,.0f}/s: "
                    f"{r['throughput_vs_c']:.3f}x (spread {1 / hi:.2f}..{1 / lo:.2f}, target {r['target']})")
        else:
            text = (f"{r['us_per_exit']:.2f} vs C {r['c_us_per_exit']:.2f} us/exit: {r['ratio']:.3f}x "
                    f"(spread {lo:.2f}..{hi:.2f}, target {r['target']})")
        out.append((r["path"], text))
    out.append(("rounds", f"{rows[0]['rounds']} interleaved pairs, medians"))
    out.append(load_row({"load_average": [rows[0]["load_average"][0], rows[-1]["load_average"][1]]}))
    emit({}, False, out)
    return 0
