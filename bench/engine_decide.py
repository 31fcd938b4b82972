"""Per-decision cost of the C policy engine vs the Python handler (kvmgate.policy.handlers).

    python bench/engine_decide.py [--rounds 7] [--n 20000] [--exits 3000] [--json]

Variants, interleaved in every round, same exits, same policy (examples/deny-by-default.toml
plus [unknown] ignore):
  python-handler   make_handler(cp, machine, audit=None)(exit)            the Python exit path
  engine-handler   make_engine_handler(Engine(cp), machine)(exit)         same contract, C decides
  engine-raw       Engine.decide_raw(index, is_write, reason, data)       the bare extension call
  c-decide         kg_decide in a C loop (bench/engine_decide.c)          no Python at all
and, on /dev/kvm, whole policy-answered exits (a guest doing RDMSR of a constant MSR) through
Machine with the Python handlers vs with EnginePolicy.  Medians of the rounds, ratios to
python-handler / python exits, and the load average are printed; never a best round."""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvmgate import Machine  # noqa: E402
from kvmgate.bench import exit_guest  # noqa: E402
from kvmgate.engine import Engine, EnginePolicy, make_engine_handler  # noqa: E402
from kvmgate.policy import compile_policy, parse_policy  # noqa: E402
from kvmgate.policy.handlers import Registers, make_handler  # noqa: E402

POLICY = (ROOT / "kvmgate" / "examples" / "deny-by-default.toml").read_text().replace(
    '[unknown]                 # MSRs KVM does not implement (that the filter let through)\naction = "gp"',
    '[unknown]\naction = "ignore"') + """
[[rule]]
msr = 0x4B564DFF
access = "read"
action = "constant"
value = 7
log = false
"""


class Ex:
    __slots__ = ("index", "is_write", "data", "reason", "vcpu")

    def __init__(self, index, is_write, data, reason):
        self.index, self.is_write, self.data, self.reason, self.vcpu = index, is_write, data, reason, 0


def exits(cp, n, seed=1):
    rnd = random.Random(seed)
    keys = sorted(cp.actions)
    out = []
    for _ in range(n):
        k = rnd.random()
        if k < 0.7:
            key = rnd.choice(keys)
            out.append(Ex(key >> 1, bool(key & 1), rnd.choice([0xFFFFFFFF81A00000, 0, 5]), 4))
        elif k < 0.85:
            out.append(Ex(rnd.randrange(0x2000, 0x3000), rnd.random() < 0.5, 0, 4))   # default deny
        else:
            out.append(Ex(rnd.randrange(0x4B564D00, 0x4B564DFF), rnd.random() < 0.5, 0, 2))
    return out


class NoHost:
    vcpus = []
    state = {}


def time_handler(h, xs, repeat):
    t = time.perf_counter_ns()
    for _ in range(repeat):
        for x in xs:
            h(x)
    return (time.perf_counter_ns() - t) / (repeat * len(xs))


def time_raw(decide, xs, repeat):
    args = [(x.index, x.is_write, x.reason, x.data) for x in xs]
    t = time.perf_counter_ns()
    for _ in range(repeat):
        for a in args:
            decide(*a)
    return (time.perf_counter_ns() - t) / (repeat * len(args))


def build_c(tmp: Path):
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    exe = tmp / "engine_decide"
    subprocess.run([cc, "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}",
                    str(ROOT / "bench" / "engine_decide.c"), str(ROOT / "csrc" / "engine.c"),
                    "-o", str(exe)], check=True)
    return exe


def time_c(exe, table_file, exits_file, repeat):
    out = subprocess.run([str(exe), str(table_file), str(exits_file), str(repeat)],
                         capture_output=True, text=True, check=True).stdout
    return float(out.split()[0])


def time_guest(policy, n):
    with Machine(exit_guest(n, 0x4B564DFF)) as m:
        m.set_policy(policy)
        t = time.perf_counter_ns()
        m.run(timeout=120)
        return (time.perf_counter_ns() - t) / n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--exits", type=int, default=3000, help="distinct exits per round")
    ap.add_argument("--repeat", type=int, default=10, help="passes over them per variant and round")
    ap.add_argument("--guest-exits", type=int, default=20000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    cp = compile_policy(parse_policy(POLICY, "bench.toml"))
    xs = exits(cp, a.exits)
    py = make_handler(cp, NoHost(), None, Registers())
    eng = Engine(cp)
    eh = make_engine_handler(eng, NoHost())
    rows = {k: [] for k in ("python-handler", "engine-handler", "engine-raw", "c-decide",
                            "guest-python", "guest-engine")}
    kvm = os.access("/dev/kvm", os.R_OK | os.W_OK)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        exe = build_c(tmp)
        (tmp / "t.bin").write_bytes(eng.table_bytes)
        (tmp / "e.bin").write_bytes(b"".join(struct.pack("<IIIIQ", x.index, x.is_write, x.reason, 0, x.data)
                                             for x in xs))
        for _ in range(a.rounds):
            rows["python-handler"].append(time_handler(py, xs, a.repeat))
            rows["engine-handler"].append(time_handler(eh, xs, a.repeat))
            rows["engine-raw"].append(time_raw(eng.decide_raw, xs, a.repeat))
            if exe is not None:
                rows["c-decide"].append(time_c(exe, tmp / "t.bin", tmp / "e.bin", a.repeat * 100))
            if kvm:
                rows["guest-python"].append(time_guest(cp, a.guest_exits))
                rows["guest-engine"].append(time_guest(EnginePolicy(cp), a.guest_exits))
    med = {k: statistics.median(v) for k, v in rows.items() if v}
    load = os.getloadavg()
    result = {"rounds": a.rounds, "loadavg": load, "median_ns": med,
              "ratio_to_python_handler": {k: med[k] / med["python-handler"]
                                          for k in ("engine-handler", "engine-raw", "c-decide") if k in med}}
    if "guest-python" in med:
        result["guest_exit_ratio_engine_to_python"] = med["guest-engine"] / med["guest-python"]
    if a.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; median of {a.rounds} interleaved rounds")
    for k, v in med.items():
        base = med["guest-python"] if k.startswith("guest") else med["python-handler"]
        print(f"  {k:<16} {v:10.1f} ns per {'exit' if k.startswith('guest') else 'decision'}   "
              f"{v / base:6.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
