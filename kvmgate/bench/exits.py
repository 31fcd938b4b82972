"""`kvmgate bench exits` and `kvmgate bench vcpus`: per-exit cost of the full MSR handler path
against a bare C KVM_RUN loop (cbaseline) on the same vCPUs and guest, in interleaved rounds."""
from __future__ import annotations

import sys
import threading
import time

from ..machine import Machine
from .cbaseline import c_loop
from .common import count_arg, emit, load_row, paired, parser

UNKNOWN_MSR = 0x4B564DFF     # in KVM's paravirtual range, implemented by nobody: exits (INVAL)


def exit_guest(n: int, msr: int = UNKNOWN_MSR, write: bool = False) -> str:
    """A guest doing `n` RDMSR (or WRMSR) of an MSR KVM fails, then HLT."""
    op = "xor eax, eax\n    xor edx, edx\n    wrmsr" if write else "rdmsr"
    return f"""
    mov ebx, {n}
again:
    mov ecx, {msr:#x}
    {op}
    dec ebx
    jnz again
    hlt"""


def time_python(m: Machine) -> float:
    """Wall seconds per MSR exit of one run of every vCPU through the Python handler path."""
    t = time.perf_counter()
    r = m.run(timeout=300)
    dt = time.perf_counter() - t
    return dt / len(r.msr_exits)


def time_c(m: Machine, n: int) -> float:
    """Wall seconds per MSR exit of the C loop on every vCPU of `m` (one thread each), each
    vCPU reset to the program's start and expected to make `n` exits."""
    lib = c_loop()
    states = m._states              # no public per-vCPU reset on Machine yet
    for st in states:
        m._reset_vcpu(st)
    got: dict[int, int] = {}

    def loop(st):
        got[st.index] = lib.kvmgate_bench_loop(st.vcpu.fd, st.vcpu.run_addr)

    threads = [threading.Thread(target=loop, args=(st,)) for st in states]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    dt = time.perf_counter() - t
    if any(v != n for v in got.values()) or len(got) != len(threads):
        raise RuntimeError(f"C loops returned {got}, expected {n} exits each")
    return dt / (n * len(threads))


def _machine(n: int, vcpus: int = 1) -> Machine:
    m = Machine(exit_guest(n), vcpus=vcpus)
    m.enable_user_space_msr(7)
    m.on_msr(lambda exit: 0 if not exit.is_write else None)
    m.run(timeout=120)               # warm up
    return m


def bench_exits(n: int = 20000, rounds: int = 9, progress=None) -> dict:
    """Per-exit cost of the handler path and of the C loop, `rounds` interleaved pairs.  The
    host's noise moves both by tens of percent between rounds, so the ratio is the median of
    per-round ratios (each pair back to back), with the spread beside it."""
    c_loop()                         # BenchError before anything runs if there is no baseline
    with _machine(n) as m:
        res = paired(rounds, lambda: time_python(m), lambda: time_c(m, n), progress)
    return {"exits_per_round": n, **res, "python_us": res["measured"] * 1e6,
            "c_us": res["baseline"] * 1e6}


def bench_vcpus(counts=(1, 2, 4), n: int = 20000, rounds: int = 9) -> list[dict]:
    """Total MSR-exit throughput with 1, 2, 4 vCPUs (one thread each): the Python handler path
    and bare C loops on the same vCPUs, interleaved per round."""
    c_loop()
    rows = []
    for k in counts:
        with _machine(n, k) as m:
            res = paired(rounds, lambda: time_python(m), lambda: time_c(m, n))
        rows.append({"vcpus": k, "python_exits_per_s": 1 / res["measured"],
                     "c_exits_per_s": 1 / res["baseline"], "python_vs_c": 1 / res["ratio"],
                     "rounds": rounds, "load_average": res["load_average"]})
    return rows


def main(argv: list[str]) -> int:
    ap = parser("exits", __doc__)
    ap.add_argument("-n", type=count_arg, default=20000, help="MSR exits per round")
    a = ap.parse_args(argv)
    prog = None if a.json else (lambda i, k: print(f"  round {i}/{k}", file=sys.stderr))
    res = bench_exits(a.n, a.rounds, prog)
    lo, hi = res["ratio_spread"]
    emit(res, a.json, [
        ("MSR exits per round", str(res["exits_per_round"])),
        ("full handler path (Python)", f"{res['python_us']:.2f} us/exit (median)"),
        ("bare C KVM_RUN loop", f"{res['c_us']:.2f} us/exit (median)"),
        ("ratio Python / C", f"{res['ratio']:.3f}x median of {res['rounds']} paired rounds "
                             "(target <= 1.35x)"),
        ("  spread", f"{lo:.2f}x .. {hi:.2f}x"),
        load_row(res)])
    return 0


def main_vcpus(argv: list[str]) -> int:
    ap = parser("vcpus", "Total MSR-exit throughput with 1, 2, 4 vCPUs, Python vs bare C loops.")
    ap.add_argument("-n", type=count_arg, default=20000, help="MSR exits per vCPU per round")
    a = ap.parse_args(argv)
    rows = bench_vcpus(n=a.n, rounds=a.rounds)
    if a.json:
        emit({"rows": rows}, True, [])
        return 0
    base = rows[0]["python_exits_per_s"]
    for r in rows:
        print(f"  {r['vcpus']} vCPU(s): {r['python_exits_per_s']:,.0f} exits/s "
              f"({r['python_exits_per_s'] / base:.2f}x of 1 vCPU)   C loops: {r['c_exits_per_s']:,.0f}/s "
              f"(Python/C {r['python_vs_c']:.2f}, median of {r['rounds']} paired rounds)  "
              f"load {r['load_average'][0]} -> {r['load_average'][1]}")
    return 0
