"""Benchmarks that print ratios against a baseline measured in the same run.

`python -m kvmgate.bench exits`: per-exit cost of the full MSR handler path vs a bare C
KVM_RUN loop (bench/exit_loop.c, built with the host C compiler) on the same vCPU and guest.
"""
from __future__ import annotations

import argparse
import ctypes as C
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .machine import Machine

C_SOURCE = Path(__file__).resolve().parent.parent / "bench" / "exit_loop.c"


def exit_guest(n: int, msr: int = 0x4B564DFF, write: bool = False) -> str:
    """A guest doing `n` RDMSR (or WRMSR) of an MSR KVM does not know, then HLT."""
    op = "xor eax, eax\n    xor edx, edx\n    wrmsr" if write else "rdmsr"
    return f"""
    mov ebx, {n}
again:
    mov ecx, {msr:#x}
    {op}
    dec ebx
    jnz again
    hlt"""


def build_c_loop(source: Path = C_SOURCE):
    """Compile the C baseline into a temporary shared library; None without a compiler."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None or not source.exists():
        return None
    out = Path(tempfile.mkdtemp(prefix="kvmgate-bench-")) / "exit_loop.so"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(source)], check=True)
    lib = C.CDLL(str(out))
    lib.kvmgate_bench_loop.argtypes = [C.c_int, C.c_void_p]
    lib.kvmgate_bench_loop.restype = C.c_long
    return lib


def _time_python(m: Machine) -> float:
    """Wall seconds per MSR exit of one run of every vCPU through the Python handler path."""
    t = time.perf_counter()
    r = m.run(timeout=300)
    dt = time.perf_counter() - t
    return dt / len(r.msr_exits)


def _time_c(m: Machine, lib, n: int) -> float:
    """Wall seconds per MSR exit of the C loop on every vCPU of `m` (one thread each), each
    vCPU reset to the program's start and expected to make `n` exits."""
    import threading
    m.reset()
    got: dict[int, int] = {}

    def loop(i, fd, run_addr):
        got[i] = lib.kvmgate_bench_loop(fd, run_addr)

    threads = [threading.Thread(target=loop, args=(i, fd, addr))
               for i, (fd, addr) in enumerate(m.vcpu_fds())]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    dt = time.perf_counter() - t
    if any(v != n for v in got.values()) or len(got) != len(threads):
        raise RuntimeError(f"C loops returned {got}, expected {n} exits each")
    return dt / (n * len(threads))


def bench_exits(n: int = 20000, rounds: int = 9, progress=None) -> dict:
    """Per-exit cost of the handler path and of the C loop, in interleaved rounds.

    The host's own noise (nested virtualisation here) moves both by tens of percent between
    rounds, so the ratio reported is the median of per-round ratios (each pair measured back
    to back), with min/min and the spread beside it."""
    lib = build_c_loop()
    py, cl = [], []
    with Machine(exit_guest(n)) as m:
        m.enable_user_space_msr(7)

        @m.on_msr
        def handler(exit):
            return 0 if not exit.is_write else None

        m.run(timeout=120)   # warm up
        for i in range(rounds):
            py.append(_time_python(m))
            if lib is not None:
                cl.append(_time_c(m, lib, n))
            if progress:
                progress(i + 1, rounds)
    res = {"exits_per_round": n, "rounds": rounds, "python_us": statistics.median(py) * 1e6}
    if cl:
        ratios = sorted(a / b for a, b in zip(py, cl))
        res["c_us"] = statistics.median(cl) * 1e6
        res["ratio"] = statistics.median(ratios)
        res["ratio_min_over_min"] = min(py) / min(cl)
        res["ratio_spread"] = [ratios[0], ratios[-1]]
    return res


def bench_vcpus(counts=(1, 2, 4), n: int = 20000, rounds: int = 3) -> list[dict]:
    """Total MSR-exit throughput with 1, 2, 4 vCPUs (one thread each): the Python handler path,
    and bare C loops on the same vCPUs in as many threads (what the host allows)."""
    lib = build_c_loop()
    rows = []
    for k in counts:
        with Machine(exit_guest(n), vcpus=k) as m:
            m.enable_user_space_msr(7)
            m.on_msr(lambda e: 0)
            m.run(timeout=120)
            py = [1 / _time_python(m) for _ in range(rounds)]
            row = {"vcpus": k, "python_exits_per_s": statistics.median(py)}
            if lib is not None:
                cl = [1 / _time_c(m, lib, n) for _ in range(rounds)]
                row["c_exits_per_s"] = statistics.median(cl)
                row["python_vs_c"] = row["python_exits_per_s"] / row["c_exits_per_s"]
            rows.append(row)
    return rows


def large_policy_text(n_rules: int) -> str:
    """A deny-by-default policy with `n_rules` rules over 16 clusters of MSRs."""
    out = ["[policy]", "default = \"deny\"", ""]
    bases = [0x0, 0x1000, 0x4000, 0x8000, 0xC000, 0x10000, 0x20000, 0x30000, 0x40000000,
             0x4B564D00, 0xC0000000, 0xC0010000, 0xC0020000, 0xC0030000, 0xD0000000, 0xE0000000]
    for i in range(n_rules):
        msr = bases[i % 16] + (i // 16) * 3
        action = ("allow", "constant", "ignore", "emulate", "deny")[i % 5]
        out += ["[[rule]]", f"msr = {msr:#x}", f"action = \"{action}\""]
        if action == "constant":
            out.append("value = 7")
        out.append("")
    return "\n".join(out)


def bench_policy(n_rules: int = 4000, n_exits: int = 20000, rounds: int = 5) -> dict:
    """Compile time of a large policy; per-exit cost of the policy handler vs a bare handler."""
    from .policy import compile_policy, parse_policy
    text = large_policy_text(n_rules)
    t = time.perf_counter()
    cp = compile_policy(parse_policy(text, "<bench>"))
    compile_s = time.perf_counter() - t
    bare, pol = [], []
    guest = exit_guest(n_exits, msr=0x35)
    policy = parse_policy("[policy]\ndefault='allow'\n[[rule]]\nmsr=0x35\naccess='read'\n"
                          "action='constant'\nvalue=0x10001\nlog=false\n", "<bench>")
    with Machine(guest) as m:
        m.enable_user_space_msr(7)
        m.set_msr_filter(compile_policy(policy).filter)
        m.on_msr(lambda e: 0x10001)
        m.run(timeout=120)
        for _ in range(rounds):
            bare.append(_time_python(m))
        m.set_policy(policy)
        m.run(timeout=120)
        for _ in range(rounds):
            pol.append(_time_python(m))
    b, p = statistics.median(bare) * 1e6, statistics.median(pol) * 1e6
    return {"rules": n_rules, "ranges": len(cp.filter.ranges), "compile_s": compile_s,
            "bare_handler_us": b, "policy_handler_us": p, "ratio": p / b}


def print_table(rows: list[tuple[str, str]]) -> None:
    w = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"  {a:<{w}}  {b}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvmgate bench", description=__doc__)
    ap.add_argument("what", choices=["exits", "policy", "vcpus"])
    ap.add_argument("--rules", type=int, default=4000, help="policy: rules in the large policy")
    ap.add_argument("-n", type=int, default=20000, help="MSR exits per round")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    prog = None if a.json else (lambda i, k: print(f"  round {i}/{k}", file=sys.stderr))
    if a.what == "vcpus":
        rows = bench_vcpus(n=a.n, rounds=a.rounds)
        if a.json:
            print(json.dumps(rows))
            return 0
        base = rows[0]["python_exits_per_s"]
        for r in rows:
            c = f"   C loops: {r['c_exits_per_s']:,.0f}/s (Python/C {r['python_vs_c']:.2f})" if "c_exits_per_s" in r else ""
            print(f"  {r['vcpus']} vCPU(s): {r['python_exits_per_s']:,.0f} exits/s "
                  f"({r['python_exits_per_s'] / base:.2f}x of 1 vCPU){c}")
        return 0
    if a.what == "policy":
        res = bench_policy(a.rules, a.n, a.rounds)
        if a.json:
            print(json.dumps(res))
            return 0
        print_table([("large policy", f"{res['rules']} rules -> {res['ranges']} filter ranges"),
                     ("parse + compile", f"{res['compile_s'] * 1e3:.1f} ms"),
                     ("bare on_msr handler", f"{res['bare_handler_us']:.2f} us/exit"),
                     ("policy handler (constant)", f"{res['policy_handler_us']:.2f} us/exit"),
                     ("ratio policy / bare", f"{res['ratio']:.3f}x")])
        return 0
    res = bench_exits(a.n, a.rounds, prog)
    if a.json:
        print(json.dumps(res))
        return 0
    rows = [("MSR exits per round", str(res["exits_per_round"])),
            ("full handler path (Python)", f"{res['python_us']:.2f} us/exit")]
    if "c_us" in res:
        lo, hi = res["ratio_spread"]
        rows += [("bare C KVM_RUN loop", f"{res['c_us']:.2f} us/exit"),
                 ("ratio Python / C", f"{res['ratio']:.3f}x median of {res['rounds']} paired rounds "
                                      f"(target <= 1.35x)"),
                 ("  min/min, spread", f"{res['ratio_min_over_min']:.3f}x, {lo:.2f}x .. {hi:.2f}x")]
    else:
        rows.append(("bare C KVM_RUN loop", "skipped: no C compiler"))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
