"""Replay throughput from a Parquet trace in the page cache, side by side with DuckDB.

`kvmgate bench replay [--events N] [--rounds R]` (or `python -m kvmgate.bench replay`).  One
synthetic trace file (a realistic skew: ~300 MSRs, 90% on six) is written (not timed), read once
to bring it into the page cache, then R interleaved rounds time, each on one CPU (the process is
pinned to one core; DuckDB runs with threads=1):

  kvmgate       replay of the file against a 16-range filter: the key columns' page checksums
                checked, the stored key summaries merged, one verdict per distinct key;
  kvmgate-full  what replay does with --full-check: every page of every column checked against
                its CRC32, the key columns decoded and counted per key (numpy.bincount,
                kvmgate.trace.fastcount), the counts compared with the stored summaries;
  duckdb        SELECT index, direction, exception, count(*) ... GROUP BY ALL over the file.

The medians (of >= 7 rounds) are printed with the load average; the counts of all three are
checked equal.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..msr.model import DEFAULT_DENY, READ, WRITE, MsrFilter, MsrRange
from ..trace import Trace, filter_decider, replay
from ..trace.schema import ROW_GROUP_EVENTS
from .common import count_arg, parser

# the handful of MSRs a Linux guest touches most, with the share of writes
HOT = [(0x10, 0.0), (0x6E0, 0.9), (0x1B, 0.0), (0xC0000080, 0.01), (0x48, 0.2), (0x3B, 0.0)]
HOT_SHARE = [0.34, 0.22, 0.14, 0.10, 0.06, 0.04]           # 90% of all events
REGIONS = [(0x0, 0x2000, 150), (0xC0000000, 0xC0000200, 40), (0xC0010000, 0xC0010300, 60),
           (0x4B564D00, 0x4B564D10, 10), (0x40000000, 0x40000100, 30), (0x800, 0x900, 10)]


def msr_pool(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(indices, probability, write share, #GP share) for a few hundred MSRs, hot ones first."""
    rng = np.random.default_rng(seed)
    hot = [i for i, _ in HOT]
    tail = []
    for lo, hi, k in REGIONS:
        cand = np.setdiff1d(np.arange(lo, hi, dtype=np.int64), hot + tail)
        tail += rng.choice(cand, size=min(k, cand.size), replace=False).tolist()
    zipf = 1.0 / np.arange(1, len(tail) + 1) ** 1.1
    prob = np.concatenate([HOT_SHARE, zipf / zipf.sum() * (1 - sum(HOT_SHARE))])
    wshare = np.concatenate([[w for _, w in HOT], rng.uniform(0, 0.5, len(tail))])
    gp = np.concatenate([np.zeros(len(hot)), np.where(rng.random(len(tail)) < 0.1, 0.5, 0.0)])
    return np.array(hot + tail, np.uint32), prob / prob.sum(), wshare, gp


def synthetic_columns(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n events with a realistic skew: ~300 distinct MSRs, 90% on six of them, mostly reads."""
    pool, prob, wshare, gp = msr_pool(seed)
    rng = np.random.default_rng(seed + 1)
    which = rng.choice(pool.size, size=n, p=prob)
    tids = np.array([4101, 4102, 4103, 4104], np.int32)
    return {"index": pool[which], "write": rng.random(n) < wshare[which],
            "value": rng.integers(0, np.iinfo(np.uint64).max, n, dtype=np.uint64, endpoint=True),
            "exception": rng.random(n) < gp[which],
            "pid": tids[rng.integers(0, tids.size, n)],
            "time_ns": np.int64(10**12) + np.cumsum(rng.integers(50, 2000, n, dtype=np.int64))}


def synthetic_trace(n: int, seed: int = 0, host: str = "bench-host") -> Trace:
    return Trace.from_arrays(**synthetic_columns(n, seed), host=host,
                             meta={"source": "synthetic", "seed": seed})


def sixteen_range_filter(seed: int = 1) -> MsrFilter:
    """A DEFAULT_DENY filter with 16 ranges (the kernel's maximum) over the pool's regions."""
    r = random.Random(seed)
    spans = [(READ, 0x0, 0x2000), (WRITE, 0x0, 0x1000), (WRITE, 0x1000, 0x1000),
             (READ | WRITE, 0xC0000000, 0x200), (READ, 0xC0010000, 0x180),
             (WRITE, 0xC0010000, 0x300), (READ, 0xC0010180, 0x180), (READ | WRITE, 0x4B564D00, 0x10),
             (READ, 0x40000000, 0x80), (WRITE, 0x40000000, 0x100), (READ, 0x40000080, 0x80),
             (READ | WRITE, 0x800, 0x100), (READ | WRITE, 0x6E0, 1), (READ, 0x10, 1),
             (READ | WRITE, 0x48, 1), (READ, 0xC0000100, 4)]
    ranges = [MsrRange.from_bits(f, base, [r.random() < 0.75 for _ in range(n)]) for f, base, n in spans]
    flt = MsrFilter(ranges, DEFAULT_DENY)
    flt.validate()
    return flt


def _warm(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass


def _duckdb_counts(con, path: Path) -> dict:
    rows = con.execute(f"SELECT index, direction, exception, count(*) FROM read_parquet('{path}') "
                       "GROUP BY ALL").fetchall()
    return {(int(i), d == "write", bool(e)): int(n) for i, d, e, n in rows}


def _key_counts(report) -> dict:
    return {k: n for k, n in _rows_by_key(report).items()}


def _rows_by_key(report) -> dict:
    out: dict = {}
    for r in report.rows:
        for v, n in r.verdicts.items():
            out[(r.index, r.write, v)] = out.get((r.index, r.write, v), 0) + n
    return out


def _pin_one_cpu() -> int | None:
    try:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[-1]})
        return cpus[-1]
    except (AttributeError, OSError):
        return None


def bench_replay(n: int = 20_000_000, *, rounds: int = 7, seed: int = 0, workdir: str | None = None,
                 full: bool = True, out=sys.stdout) -> dict:
    """Median events/s of kvmgate replay (and its full decode) vs DuckDB over one Parquet file."""
    say = (lambda *a: print(*a, file=out, flush=True)) if out is not None else (lambda *a: None)
    if rounds < 1:
        raise ValueError("rounds >= 1")
    try:
        import duckdb
    except ImportError:
        duckdb = None
    flt = sixteen_range_filter(seed + 1)
    decide = filter_decider(flt)
    tmp = Path(workdir or tempfile.mkdtemp(prefix="kvmgate-trace-bench-"))
    path = tmp / "bench.parquet"
    try:
        t = time.perf_counter()
        synthetic_trace(n, seed).save(path, row_group_events=ROW_GROUP_EVENTS)
        size = path.stat().st_size
        say(f"wrote {n:,} events to {path} ({size / n:.2f} B/event, {time.perf_counter() - t:.1f} s, not timed)")
        _warm(path)
        cpu = _pin_one_cpu()
        import pyarrow
        pyarrow.set_cpu_count(1)
        pyarrow.set_io_thread_count(1)
        con = None
        if duckdb is not None:
            con = duckdb.connect()
            con.execute("SET threads=1")
        runners = {"kvmgate": lambda: replay(path, decide)}
        if full:
            runners["kvmgate-full"] = lambda: replay(path, decide, full=True)
        if con is not None:
            runners["duckdb"] = lambda: _duckdb_counts(con, path)
        times: dict[str, list[float]] = {k: [] for k in runners}
        results: dict = {}
        load = os.getloadavg()
        for _ in range(rounds):
            for name, fn in runners.items():            # interleaved: every runner each round
                t0 = time.perf_counter()
                results[name] = fn()
                times[name].append(time.perf_counter() - t0)
        load_end = os.getloadavg()
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    ours = _rows_by_key(results["kvmgate"])
    if "kvmgate-full" in results and _rows_by_key(results["kvmgate-full"]) != ours:
        raise AssertionError("replay from the key summaries and from every event differ")
    if "duckdb" in results:
        want = {}
        for (i, w, e), c in results["duckdb"].items():
            k = (i, w, decide(i, w, e))
            want[k] = want.get(k, 0) + c
        if want != ours:
            raise AssertionError("kvmgate and DuckDB count differently")
    med = {k: statistics.median(v) for k, v in times.items()}
    eps = {k: n / v for k, v in med.items()}
    res = {"events": n, "file_bytes": size, "bytes_per_event": size / n, "rounds": rounds,
           "cpu": cpu, "loadavg_start": load, "loadavg_end": load_end,
           "median_s": med, "events_per_s": eps, "all_s": times,
           "distinct_keys": results["kvmgate"].distinct_keys,
           "decide_calls": results["kvmgate"].decide_calls, "totals": results["kvmgate"].totals}
    if "duckdb" in eps:
        res["kvmgate_vs_duckdb"] = eps["kvmgate"] / eps["duckdb"]
    say(f"{res['distinct_keys']} distinct keys -> {res['decide_calls']} decide() calls; totals {res['totals']}")
    say(f"median of {rounds} interleaved rounds on one CPU ({cpu}); load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the start, {load_end[0]:.2f} at the end")
    for name in runners:
        say(f"  {name:<13} {eps[name] / 1e6:10.1f} M events/s   ({med[name] * 1e3:8.1f} ms; "
            f"rounds {', '.join(f'{x * 1e3:.0f}' for x in times[name])} ms)")
    if "duckdb" in eps:
        say(f"  kvmgate / duckdb: {res['kvmgate_vs_duckdb']:.1f}x" + (
            f"   kvmgate-full / duckdb: {eps['kvmgate-full'] / eps['duckdb']:.1f}x" if "kvmgate-full" in eps else ""))
    else:
        say("  duckdb: not installed (pip install duckdb) - no comparison")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = parser("replay", __doc__, rounds=7)
    ap.add_argument("--events", type=count_arg, default=20_000_000)
    ap.add_argument("--no-full", action="store_true", help="skip the decode-every-event runner")
    a = ap.parse_args(argv)
    res = bench_replay(a.events, rounds=a.rounds, full=not a.no_full, out=None if a.json else sys.stdout)
    if a.json:
        print(json.dumps(res, indent=2, default=str))
    return 0
