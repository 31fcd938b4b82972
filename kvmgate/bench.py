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
    t = time.perf_counter()
    r = m.run(timeout=120)
    dt = time.perf_counter() - t
    return dt / len(r.msr_exits)


def _time_c(m: Machine, lib, n: int) -> float:
    st = m._states[0]
    m._reset_vcpu(st)
    vcpu = st.vcpu
    addr = vcpu.run_addr
    t = time.perf_counter()
    got = lib.kvmgate_bench_loop(vcpu.fd, addr)
    dt = time.perf_counter() - t
    if got != n:
        raise RuntimeError(f"C loop returned {got}, expected {n} exits")
    return dt / n


def bench_exits(n: int = 20000, rounds: int = 5, progress=None) -> dict:
    """Median per-exit seconds of the handler path and of the C loop, interleaved."""
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
        res["c_us"] = statistics.median(cl) * 1e6
        res["ratio"] = res["python_us"] / res["c_us"]
    return res


def print_table(rows: list[tuple[str, str]]) -> None:
    w = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"  {a:<{w}}  {b}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvmgate bench", description=__doc__)
    ap.add_argument("what", choices=["exits"])
    ap.add_argument("-n", type=int, default=20000, help="MSR exits per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    prog = None if a.json else (lambda i, k: print(f"  round {i}/{k}", file=sys.stderr))
    res = bench_exits(a.n, a.rounds, prog)
    if a.json:
        print(json.dumps(res))
        return 0
    rows = [("MSR exits per round", str(res["exits_per_round"])),
            ("full handler path (Python)", f"{res['python_us']:.2f} us/exit")]
    if "c_us" in res:
        rows += [("bare C KVM_RUN loop", f"{res['c_us']:.2f} us/exit"),
                 ("ratio Python / C", f"{res['ratio']:.3f}x (target <= 1.35x)")]
    else:
        rows.append(("bare C KVM_RUN loop", "skipped: no C compiler"))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
