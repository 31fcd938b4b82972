"""Replay a recorded trace against a policy: which of the guest's MSR accesses it would allow.

The policy is asked once per distinct (index, write, exception) key of the whole trace (cached
across chunks); per event, the only work is one np.bincount over the chunk's dictionary codes.
Memory is bounded by the number of distinct keys, never by the number of events.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..msr.model import READ, WRITE, MsrFilter
from .store import U64_MAX, TraceFormatError, open_trace, unpack_key64

Decide = Callable[[int, bool, bool], str]


def filter_decider(flt: MsrFilter, allow: str = "allow", deny: str = "deny") -> Decide:
    """decide() for a bare MSR filter: its verdict through MsrFilter.allows (exception ignored)."""
    def decide(index: int, write: bool, exception: bool) -> str:
        return allow if flt.allows(index, WRITE if write else READ) else deny
    return decide


@dataclass
class ReplayRow:
    """One MSR and direction: its events, split by verdict."""
    index: int
    write: bool
    events: int
    verdicts: dict[str, int]
    gp: int                    # events the kernel answered with #GP when recorded
    first_ns: int
    last_ns: int
    pids: tuple[int, ...]
    name: str | None = None

    @property
    def direction(self) -> str:
        return "write" if self.write else "read"

    def verdict(self) -> str:
        """The single verdict, or "mixed" when the policy split this row (by exception)."""
        return next(iter(self.verdicts)) if len(self.verdicts) == 1 else "mixed"

    def to_dict(self) -> dict:
        return {"index": f"{self.index:#x}", "name": self.name, "access": self.direction,
                "events": self.events, "verdicts": self.verdicts, "gp": self.gp,
                "first_ns": self.first_ns, "last_ns": self.last_ns, "pids": list(self.pids)}


@dataclass
class ReplayReport:
    """Totals per verdict and rows per (MSR, direction)."""
    events: int
    totals: dict[str, int]
    rows: list[ReplayRow]
    distinct_keys: int
    decide_calls: int
    chunks: int
    seconds: float
    meta: dict = field(default_factory=dict)

    @property
    def verdicts(self) -> list[str]:
        return list(self.totals)

    def row(self, index: int, write: bool) -> ReplayRow | None:
        for r in self.rows:
            if r.index == index and r.write == bool(write):
                return r
        return None

    def to_dict(self) -> dict:
        return {"events": self.events, "totals": self.totals, "distinct_keys": self.distinct_keys,
                "decide_calls": self.decide_calls, "chunks": self.chunks,
                "seconds": round(self.seconds, 6),
                "rows": [r.to_dict() for r in self.rows],
                "trace": {k: v for k, v in self.meta.items() if k != "tasks"}}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def table_rows(self, limit: int | None = None) -> list[dict]:
        """Rows as flat dicts for kvmgate.report.table, busiest first."""
        rows = sorted(self.rows, key=lambda r: (-r.events, r.index, r.write))[:limit]
        out = []
        for r in rows:
            d = {"msr": f"{r.index:#x}", "name": r.name or "", "access": r.direction,
                 "events": r.events}
            for v in self.verdicts:
                d[v] = r.verdicts.get(v, 0)
            d.update(gp=r.gp, first_s=f"{r.first_ns / 1e9:.6f}", last_s=f"{r.last_ns / 1e9:.6f}",
                     pids=_pids_text(r.pids))
            out.append(d)
        return out

    def table(self, limit: int | None = None) -> str:
        """A summary line per verdict, then the rows (busiest first) as a text table."""
        import io
        from ..report import table
        buf = io.StringIO()
        total = self.events or 1
        buf.write(f"{self.events} events, {len(self.rows)} MSR/direction rows, "
                  f"{self.distinct_keys} distinct keys, {self.chunks} chunks\n")
        for v, n in self.totals.items():
            buf.write(f"  {v}: {n} ({100 * n / total:.2f}%)\n")
        buf.write("\n")
        rows = self.table_rows(limit)
        table(rows, out=buf)
        if limit is not None and len(self.rows) > limit:
            buf.write(f"... {len(self.rows) - limit} more rows\n")
        return buf.getvalue()


def _pids_text(pids: tuple[int, ...], shown: int = 4) -> str:
    text = ",".join(map(str, pids[:shown]))
    return text + (f",+{len(pids) - shown}" if len(pids) > shown else "")


class _Keys:
    """Every distinct key seen so far: a sorted u64 array for vectorised lookup, a global id per
    key (order of first sight), the verdict id and the accumulated statistics per id."""

    def __init__(self, decide: Decide):
        self.decide = decide
        self.sorted = np.zeros(0, np.uint64)
        self.sorted_gid = np.zeros(0, np.int64)
        self.keys = np.zeros(0, np.uint64)
        self.vid = np.zeros(0, np.int64)
        self.count = np.zeros(0, np.uint64)
        self.first = np.zeros(0, np.uint64)
        self.last = np.zeros(0, np.uint64)
        self.pairs = np.zeros(0, np.uint64)        # gid << 32 | pid, sorted unique
        self.labels: dict[str, int] = {}
        self.calls = 0

    def ids(self, keys: np.ndarray) -> np.ndarray:
        """Global ids of `keys` (distinct), asking decide() about the ones never seen."""
        pos = np.searchsorted(self.sorted, keys)
        found = pos < self.sorted.shape[0]
        found[found] = self.sorted[pos[found]] == keys[found]
        gids = np.empty(keys.shape[0], np.int64)
        gids[found] = self.sorted_gid[pos[found]]
        new = keys[~found]
        if new.shape[0]:
            gids[~found] = self._add(new)
        return gids

    def _add(self, new: np.ndarray) -> np.ndarray:
        n0 = self.keys.shape[0]
        gids = np.arange(n0, n0 + new.shape[0], dtype=np.int64)
        vids = []
        for index, write, exc in zip(*(a.tolist() for a in unpack_key64(new))):
            label = str(self.decide(index, write, exc))
            self.calls += 1
            vids.append(self.labels.setdefault(label, len(self.labels)))
        self.keys = np.concatenate([self.keys, new])
        self.vid = np.concatenate([self.vid, np.array(vids, np.int64)])
        self.count = np.concatenate([self.count, np.zeros(new.shape[0], np.uint64)])
        self.first = np.concatenate([self.first, np.full(new.shape[0], U64_MAX, np.uint64)])
        self.last = np.concatenate([self.last, np.zeros(new.shape[0], np.uint64)])
        order = np.argsort(np.concatenate([self.sorted, new]), kind="stable")
        self.sorted = np.concatenate([self.sorted, new])[order]
        self.sorted_gid = np.concatenate([self.sorted_gid, gids])[order]
        return gids


def replay(reader, decide: Decide, progress: Callable[[int, float], None] | None = None) -> ReplayReport:
    """Count a trace's events per (MSR, direction, verdict), asking `decide(index, write,
    exception) -> label` once per distinct key.  `reader`: a TraceReader, a Trace, or a path.

    Per chunk: np.bincount of the codes gives events per dictionary key (checked against the
    chunk's stored counts); everything else is per key.  `progress(events, seconds)` per chunk.
    """
    started = time.perf_counter()
    src = open_trace(reader)
    keys = _Keys(decide)
    events = chunks = 0
    for chunk in src.iter_chunks():
        k = chunk.nkeys
        counts = np.bincount(chunk.codes, minlength=k)
        if counts.shape[0] != k or not np.array_equal(counts, chunk.key_count):
            raise TraceFormatError(f"chunk {chunks}: codes do not match the dictionary counts")
        gids = keys.ids(chunk.keys64())
        keys.count[gids] += counts.astype(np.uint64)
        keys.first[gids] = np.minimum(keys.first[gids], chunk.key_first_ns)   # gids are distinct
        keys.last[gids] = np.maximum(keys.last[gids], chunk.key_last_ns)
        pairs = (gids[chunk.pair_key].astype(np.uint64) << np.uint64(32)) | chunk.pair_pid.view(np.uint32)
        keys.pairs = np.union1d(keys.pairs, pairs)
        events += len(chunk)
        chunks += 1
        if progress is not None:
            progress(events, time.perf_counter() - started)
    meta = dict(getattr(src, "meta", {}) or {})
    return _report(keys, events, chunks, time.perf_counter() - started, meta)


def _msr_name(index: int) -> str | None:
    try:
        from ..msr.names import msr_name
        return msr_name(index)
    except Exception:   # noqa: BLE001 - names are decoration; a broken table must not stop replay
        return None


def _report(keys: _Keys, events: int, chunks: int, seconds: float, meta: dict) -> ReplayReport:
    labels = sorted(keys.labels, key=keys.labels.get)
    totals = {lab: int(keys.count[keys.vid == v].sum()) for lab, v in keys.labels.items()}
    index, write, exc = (a.tolist() for a in unpack_key64(keys.keys))
    pid_gid = (keys.pairs >> np.uint64(32)).astype(np.int64)
    pid_val = (keys.pairs & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)
    bounds = np.searchsorted(pid_gid, np.arange(keys.keys.shape[0] + 1))
    grouped: dict[tuple[int, bool], dict] = {}
    for g in range(keys.keys.shape[0]):
        r = grouped.setdefault((index[g], write[g]), {"events": 0, "verdicts": {}, "gp": 0,
                                                     "first": U64_MAX, "last": 0, "pids": set()})
        n = int(keys.count[g])
        lab = labels[keys.vid[g]]
        r["events"] += n
        r["verdicts"][lab] = r["verdicts"].get(lab, 0) + n
        r["gp"] += n if exc[g] else 0
        r["first"] = min(r["first"], int(keys.first[g]))
        r["last"] = max(r["last"], int(keys.last[g]))
        r["pids"].update(pid_val[bounds[g]:bounds[g + 1]].tolist())
    rows = [ReplayRow(i, w, r["events"], r["verdicts"], r["gp"], r["first"], r["last"],
                      tuple(sorted(r["pids"])), _msr_name(i))
            for (i, w), r in sorted(grouped.items())]
    return ReplayReport(events, totals, rows, int(keys.keys.shape[0]), keys.calls, chunks, seconds, meta)


def naive_counts(index, write, exception, decide: Decide) -> dict[tuple[int, bool, str], int]:
    """The per-event reference: decide() for every event, counted per (index, write, verdict)."""
    out: dict[tuple[int, bool, str], int] = {}
    for i, w, e in zip(np.asarray(index).tolist(), np.asarray(write).tolist(),
                       np.asarray(exception).tolist()):
        k = (i, bool(w), decide(i, bool(w), bool(e)))
        out[k] = out.get(k, 0) + 1
    return out


def report_counts(report: ReplayReport) -> dict[tuple[int, bool, str], int]:
    """A report flattened to {(index, write, verdict): events}, comparable with naive_counts."""
    return {(r.index, r.write, v): n for r in report.rows for v, n in r.verdicts.items()}


__all__ = ["replay", "filter_decider", "ReplayReport", "ReplayRow", "naive_counts", "report_counts"]
