"""`kvmgate bench wrap`: what the shim costs inside QEMU, measured by the guest (RDTSC around N
RDMSRs of one MSR, in the PVH guest of kvmgate.wrap.pvhguest), in interleaved rounds:

- MSR 0x35 (MSR_CORE_THREAD_COUNT) answered by the shim (a policy `constant` rule naming it)
  vs the same MSR answered by QEMU itself (unwrapped QEMU: QEMU's filter sends it to user space
  and kvm_rdmsr_core_thread_count answers): target <= 1.0x;
- the same 0x35 through a wrapped QEMU whose policy does not name it (the shim hands the exit
  to QEMU): the shim's pass-through cost;
- a guest touching only an MSR the kernel handles (IA32_SYSENTER_CS), wrapped with an allow-all
  policy vs unwrapped: ~1.0x.

Each ratio is the median over rounds of the per-round ratio (both sides measured in the same
round, order alternating); never a best round.  The load average is printed with it.
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
from ..wrap.session import Wrap
from .common import count_arg, emit, parser

SHIM_0X35 = """[policy]
name = "bench-shim-0x35"
default = "allow"
log = false

[[rule]]
msr = 0x35
access = "read"
action = "constant"
value = 0x10001
log = false
"""


def _cycles(stdout: str, what: str) -> int:
    res = pvhguest.parse(stdout)
    if "cycles" not in res:
        raise RuntimeError(f"bench guest ({what}) printed no cycle count: {stdout[-300:]!r}")
    return res["cycles"]


def run_unwrapped(elf: Path) -> int:
    r = subprocess.run(pvhguest.qemu_argv(elf, 1), check=False, capture_output=True, text=True, timeout=300)
    return _cycles(r.stdout, "unwrapped")


def run_wrapped(elf: Path, policy: Path | None, tmp: Path) -> int:
    out = tmp / "vmm.out"
    with open(out, "w") as f:
        w = Wrap(pvhguest.qemu_argv(elf, 1), policy=str(policy) if policy else None,
                 stderr=io.StringIO(), vmm_stdout=f, vmm_stderr=subprocess.DEVNULL)
        w.run()
    return _cycles(out.read_text(), "wrapped")


def bench_wrap(n: int = 20000, rounds: int = 7, progress=None) -> dict:
    """Cycles per RDMSR for each configuration, and the per-round ratios' medians."""
    rounds = max(rounds, 7)
    with tempfile.TemporaryDirectory(prefix="kvmgate-bench-wrap-") as d:
        tmp = Path(d)
        user = pvhguest.build([(0x35, 0, 0)], tmp, loops=n, name="user")
        kern = pvhguest.build([(0x174, 0, 0)], tmp, loops=n, name="kern")
        pol = tmp / "shim.toml"
        pol.write_text(SHIM_0X35)
        allow = tmp / "allow.toml"
        allow.write_text('[policy]\ndefault = "allow"\nlog = false\n')
        rows = []
        for i in range(rounds):
            runs = [("shim", lambda: run_wrapped(user, pol, tmp)),
                    ("qemu", lambda: run_unwrapped(user)),
                    ("passthrough", lambda: run_wrapped(user, allow, tmp)),
                    ("kernel_wrapped", lambda: run_wrapped(kern, allow, tmp)),
                    ("kernel_unwrapped", lambda: run_unwrapped(kern))]
            if i % 2:
                runs.reverse()
            row = {name: fn() / n for name, fn in runs}
            rows.append(row)
            if progress:
                progress(i + 1, rounds)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    ratio = {
        "shim_vs_qemu": statistics.median(r["shim"] / r["qemu"] for r in rows),
        "passthrough_vs_qemu": statistics.median(r["passthrough"] / r["qemu"] for r in rows),
        "kernel_wrapped_vs_unwrapped": statistics.median(
            r["kernel_wrapped"] / r["kernel_unwrapped"] for r in rows),
    }
    spread = {k: (min(r["shim"] / r["qemu"] for r in rows), max(r["shim"] / r["qemu"] for r in rows))
              for k in ("shim_vs_qemu",)}
    return {"exits_per_round": n, "rounds": rounds, "cycles_per_exit": med, "ratio": ratio,
            "shim_vs_qemu_spread": spread["shim_vs_qemu"], "loadavg": os.getloadavg()}


def render(res: dict) -> list[tuple[str, str]]:
    c, r = res["cycles_per_exit"], res["ratio"]
    lo, hi = res["shim_vs_qemu_spread"]
    la = ", ".join(f"{x:.2f}" for x in res["loadavg"])
    return [("RDMSRs per guest run", str(res["exits_per_round"])),
            ("0x35 answered by the shim", f"{c['shim']:.0f} cycles/exit"),
            ("0x35 answered by QEMU (unwrapped)", f"{c['qemu']:.0f} cycles/exit"),
            ("ratio shim / QEMU", (f"{r['shim_vs_qemu']:.3f}x median of {res['rounds']} interleaved "
                                   f"rounds (target <= 1.0x; spread {lo:.2f}x .. {hi:.2f}x)")),
            ("0x35 passed through the shim to QEMU", (f"{c['passthrough']:.0f} cycles/exit, "
                                                      f"{r['passthrough_vs_qemu']:.3f}x unwrapped")),
            ("kernel-handled MSR wrapped / unwrapped", (f"{c['kernel_wrapped']:.0f} vs "
                                                        f"{c['kernel_unwrapped']:.0f} cycles/exit, "
                                                        f"{r['kernel_wrapped_vs_unwrapped']:.3f}x")),
            ("load average", la)]


def main(argv: list[str]) -> int:
    ap = parser("wrap", __doc__, rounds=7)
    ap.add_argument("-n", type=count_arg, default=20000, help="RDMSRs per guest run")
    a = ap.parse_args(argv)
    res = bench_wrap(a.n, a.rounds, lambda i, n: print(f"  round {i}/{n}", file=sys.stderr, flush=True))
    emit(res, a.json, render(res))
    return 0
