"""Replay throughput on a synthetic trace, against per-event Python in the same run.

`python -m kvmgate.trace bench [--events N]` or bench/trace_replay.py.  Trace generation,
encoding and writing are not timed.  Figures: replay of chunks already in memory; replay from
the file with its pages in the page cache; replay from the file after its pages were dropped
(posix_fadvise DONTNEED on that file only), which includes the disk.  The Python baseline calls
MsrFilter.allows for every event of a sample and counts per (index, write, verdict).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..msr.model import DEFAULT_DENY, READ, WRITE, MsrFilter, MsrRange
from .replay import filter_decider, replay, report_counts
from .store import DEFAULT_CHUNK_EVENTS, Trace, TraceReader

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
            "time_ns": np.uint64(10**12) + np.cumsum(rng.integers(50, 2000, n, dtype=np.uint64))}


def synthetic_trace(n: int, seed: int = 0, chunk_events: int = DEFAULT_CHUNK_EVENTS) -> Trace:
    return Trace.from_arrays(**synthetic_columns(n, seed), chunk_events=chunk_events,
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


def python_baseline(index: np.ndarray, write: np.ndarray, flt: MsrFilter) -> tuple[dict, float]:
    """Per event: MsrFilter.allows and a dict count per (index, write, verdict); (counts, s)."""
    idx, wr = index.tolist(), write.tolist()
    counts: dict = {}
    allows = flt.allows
    t = time.perf_counter()
    for i, w in zip(idx, wr):
        k = (i, w, "allow" if allows(i, WRITE if w else READ) else "deny")
        counts[k] = counts.get(k, 0) + 1
    return counts, time.perf_counter() - t


def _best(fn, repeat: int) -> float:
    return min(fn() for _ in range(repeat))


def _drop_cache(path: Path) -> bool:
    """Evict one file's pages from the page cache (posix_fadvise DONTNEED); nothing else."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def bench_replay(n: int = 10_000_000, *, sample: int = 200_000, chunk_events: int = DEFAULT_CHUNK_EVENTS,
                 repeat: int = 3, seed: int = 0, workdir: str | None = None, out=sys.stdout) -> dict:
    """Replay events/s (memory, warm file, cold file) vs per-event Python; prints and returns them."""
    say = (lambda *a: print(*a, file=out)) if out is not None else (lambda *a: None)
    flt = sixteen_range_filter(seed + 1)
    decide = filter_decider(flt)
    t = time.perf_counter()
    cols = synthetic_columns(n, seed)
    trace = Trace.from_arrays(**cols, chunk_events=chunk_events)
    say(f"built {n:,} events in {len(trace.chunks)} chunks of <= {chunk_events:,} "
        f"({time.perf_counter() - t:.1f} s, not timed)")

    first = replay(trace, decide)
    mem = _best(lambda: replay(trace, decide).seconds, repeat)

    tmp = Path(workdir or tempfile.mkdtemp(prefix="kvmgate-trace-bench-"))
    path = tmp / "bench.kvmtrace"
    try:
        trace.save(path)
        size = path.stat().st_size

        def from_file() -> float:
            t0 = time.perf_counter()
            with TraceReader(path) as r:
                rep = replay(r, decide)
            assert rep.totals == first.totals
            return time.perf_counter() - t0

        warm = _best(from_file, repeat)
        cold = from_file() if _drop_cache(path) else None
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)

    m = min(sample, n)
    py_counts, py_s = python_baseline(cols["index"][:m], cols["write"][:m], flt)
    check = report_counts(replay(Trace.from_arrays(cols["index"][:m], cols["write"][:m],
                                                   exception=cols["exception"][:m]), decide))
    if check != py_counts:
        raise AssertionError("replay counts differ from the per-event Python count")

    res = {"events": n, "chunks": len(trace.chunks), "chunk_events": chunk_events,
           "distinct_keys": first.distinct_keys, "decide_calls": first.decide_calls,
           "file_bytes": size, "totals": first.totals,
           "replay_memory_eps": n / mem, "replay_file_warm_eps": n / warm,
           "replay_file_cold_eps": n / cold if cold else None,
           "python_sample": m, "python_eps": m / py_s, "python_extrapolated_s": n * py_s / m,
           "ratio_memory_vs_python": (n / mem) / (m / py_s), "cpus": len(os.sched_getaffinity(0))}
    say(f"{first.distinct_keys} distinct (index, write, exception) keys -> {first.decide_calls} "
        f"decide() calls; totals {first.totals}")
    say(f"replay, chunks in memory:          {res['replay_memory_eps'] / 1e6:9.1f} M events/s  ({mem * 1e3:.1f} ms)")
    say(f"replay, file in page cache:        {res['replay_file_warm_eps'] / 1e6:9.1f} M events/s  ({warm * 1e3:.1f} ms, "
        f"{size / 2**20:.0f} MiB file)")
    if cold:
        say(f"replay, file cold (fadvise DONTNEED): {res['replay_file_cold_eps'] / 1e6:6.1f} M events/s  ({cold * 1e3:.1f} ms)")
    say(f"per-event Python (MsrFilter.allows): {res['python_eps'] / 1e6:7.2f} M events/s  "
        f"({m:,}-event sample; {res['python_extrapolated_s']:.1f} s extrapolated to {n:,})")
    say(f"ratio replay (memory) / Python:    {res['ratio_memory_vs_python']:9.0f} x   "
        f"(one thread; counts checked equal on the sample)")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvmgate.trace bench", description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--sample", type=int, default=200_000)
    ap.add_argument("--chunk-events", type=int, default=DEFAULT_CHUNK_EVENTS)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    res = bench_replay(a.events, sample=a.sample, chunk_events=a.chunk_events, repeat=a.repeat,
                       out=None if a.json else sys.stdout)
    if a.json:
        print(json.dumps(res, indent=2))
    return 0
