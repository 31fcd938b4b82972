"""Replay recorded traces against a policy: which of the guests' MSR accesses it would allow.

The events reduce to key summaries (kvmgate.trace.summary: per distinct (host, MSR, direction,
exception), counts, times, threads), stored per row group in each file and merged across files
and hosts; the policy is then asked once per distinct (MSR, direction, exception).  Memory is
bounded by the number of distinct keys, never by the number of events.
"""
from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..msr.model import READ, WRITE, MsrFilter
from ..msr.names import msr_name
from ..report import table
from .sources import collect
from .memory import Trace
from .summary import Summary

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
    host: str | None = None     # with by_host: the host; else rows sum every host

    @property
    def direction(self) -> str:
        return "write" if self.write else "read"

    def verdict(self) -> str:
        """The single verdict, or "mixed" when the policy split this row (by exception)."""
        return next(iter(self.verdicts)) if len(self.verdicts) == 1 else "mixed"

    def to_dict(self) -> dict:
        d = {"index": f"{self.index:#x}", "name": self.name, "access": self.direction,
             "events": self.events, "verdicts": self.verdicts, "gp": self.gp,
             "first_ns": self.first_ns, "last_ns": self.last_ns, "pids": list(self.pids)}
        if self.host is not None:
            d["host"] = self.host
        return d


@dataclass
class ReplayReport:
    """Totals per verdict and rows per (MSR, direction)."""
    events: int
    totals: dict[str, int]
    rows: list[ReplayRow]
    distinct_keys: int
    decide_calls: int
    row_groups: int
    seconds: float
    meta: dict = field(default_factory=dict)
    files: list = field(default_factory=list)            # FileInfo per file read
    partial: list[str] = field(default_factory=list)     # unfinished recordings read
    by_host: dict | None = None                          # host -> totals, with by_host

    @property
    def verdicts(self) -> list[str]:
        return list(self.totals)

    def row(self, index: int, write: bool, host: str | None = None) -> ReplayRow | None:
        for r in self.rows:
            if r.index == index and r.write == bool(write) and r.host == host:
                return r
        return None

    def to_dict(self) -> dict:
        d = {"events": self.events, "totals": self.totals, "distinct_keys": self.distinct_keys,
             "decide_calls": self.decide_calls, "row_groups": self.row_groups,
             "seconds": round(self.seconds, 6), "rows": [r.to_dict() for r in self.rows],
             "files": [f.to_dict() for f in self.files], "partial": self.partial,
             "trace": {k: v for k, v in self.meta.items() if k != "tasks"}}
        if self.by_host is not None:
            d["by_host"] = self.by_host
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def table_rows(self, limit: int | None = None) -> list[dict]:
        """Rows as flat dicts for kvmgate.report.table, busiest first."""
        rows = sorted(self.rows, key=lambda r: (r.host or "", -r.events, r.index, r.write))[:limit]
        out = []
        for r in rows:
            d = {"host": r.host} if r.host is not None else {}
            d |= {"msr": f"{r.index:#x}", "name": r.name or "", "access": r.direction,
                 "events": r.events}
            for v in self.verdicts:
                d[v] = r.verdicts.get(v, 0)
            d.update(gp=r.gp, first_s=f"{r.first_ns / 1e9:.6f}", last_s=f"{r.last_ns / 1e9:.6f}",
                     pids=_pids_text(r.pids))
            out.append(d)
        return out

    def table(self, limit: int | None = None) -> str:
        """A summary line per verdict, then the rows (busiest first) as a text table."""
        buf = io.StringIO()
        total = self.events or 1
        buf.write(f"{self.events} events, {len(self.rows)} MSR/direction rows, "
                  f"{self.distinct_keys} distinct keys, {self.row_groups} row groups\n")
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


def _msr_name(index: int) -> str | None:
    try:
        return msr_name(index)
    except Exception:   # noqa: BLE001 - names are decoration; a broken table must not stop replay
        return None


def verdicts_of(summary: Summary, decide: Decide) -> tuple[list[str], int]:
    """The verdict of every key of `summary`: decide() once per distinct (index, write,
    exception), whatever the number of hosts and events.  (verdicts, decide calls)."""
    _, index, write, exc = summary.columns()
    cache: dict[tuple[int, bool, bool], str] = {}
    out = []
    for key in zip(index.tolist(), write.tolist(), exc.tolist()):
        v = cache.get(key)
        if v is None:
            v = cache[key] = str(decide(*key))
        out.append(v)
    return out, len(cache)


def report_from_summary(summary: Summary, decide: Decide, *, by_host: bool = False,
                        files: list | None = None, partial: list[str] | None = None,
                        meta: dict | None = None, started: float | None = None) -> ReplayReport:
    """Count a summary's events per (MSR, direction) and verdict (per host too with by_host)."""
    started = time.perf_counter() if started is None else started
    verdicts, calls = verdicts_of(summary, decide)
    host, index, write, exc = (a.tolist() for a in summary.columns())
    count = summary.count.tolist()
    first, last = summary.first_ns.tolist(), summary.last_ns.tolist()
    pids = summary.pids_of()
    totals: dict[str, int] = {}
    host_totals: dict[str, dict[str, int]] = {}
    grouped: dict[tuple, dict] = {}
    for k in range(len(summary)):
        n, v = count[k], verdicts[k]
        totals[v] = totals.get(v, 0) + n
        hname = summary.hosts[host[k]]
        ht = host_totals.setdefault(hname, {})
        ht[v] = ht.get(v, 0) + n
        gk = (hname if by_host else None, index[k], write[k])
        r = grouped.setdefault(gk, {"events": 0, "verdicts": {}, "gp": 0, "first": first[k],
                                    "last": last[k], "pids": set()})
        r["events"] += n
        r["verdicts"][v] = r["verdicts"].get(v, 0) + n
        r["gp"] += n if exc[k] else 0
        r["first"] = min(r["first"], first[k])
        r["last"] = max(r["last"], last[k])
        r["pids"].update(pids[k])
    rows = [ReplayRow(i, w, r["events"], r["verdicts"], r["gp"], r["first"], r["last"],
                      tuple(sorted(r["pids"])), _msr_name(i), h)
            for (h, i, w), r in sorted(grouped.items(), key=lambda kv: (kv[0][0] or "", kv[0][1], kv[0][2]))]
    return ReplayReport(summary.events, totals, rows, len(summary), calls,
                        sum(f.row_groups for f in files or []), time.perf_counter() - started,
                        dict(meta or {}), files=list(files or []), partial=list(partial or []),
                        by_host=host_totals if by_host else None)


def replay(source, decide: Decide, *, by_host: bool = False, full: bool = False,
           dask: str | None = None) -> ReplayReport:
    """What `decide(index, write, exception) -> label` says about every event of `source`,
    counted per (MSR, direction) and label; decide() is asked once per distinct key.

    `source`: a Trace, a Summary, a path (file or directory) or a list of paths.  Files are
    checked as they are read (kvmgate.trace.reading); `full` decodes every event instead of
    counting from the stored key summaries; `dask` runs the per-file work on a Dask cluster
    (kvmgate.trace.sources).  Unfinished recordings are read and named in `report.partial`.
    """
    started = time.perf_counter()
    if isinstance(source, Trace):
        return report_from_summary(source.summary(), decide, by_host=by_host, meta=source.meta,
                                   started=started)
    if isinstance(source, Summary):
        return report_from_summary(source, decide, by_host=by_host, started=started)
    paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    got = collect(paths, full=full, dask=dask)
    return report_from_summary(got.summary, decide, by_host=by_host, files=got.files,
                               partial=got.partial, meta=got.meta, started=started)


def naive_counts(index, write, exception, decide: Decide) -> dict[tuple[int, bool, str], int]:
    """The per-event reference: decide() for every event, counted per (index, write, verdict)."""
    out: dict[tuple[int, bool, str], int] = {}
    for i, w, e in zip(np.asarray(index).tolist(), np.asarray(write).tolist(),
                       np.asarray(exception).tolist()):
        k = (i, bool(w), decide(i, bool(w), bool(e)))
        out[k] = out.get(k, 0) + 1
    return out


def report_counts(report: ReplayReport) -> dict[tuple[int, bool, str], int]:
    """A report flattened to {(index, write, verdict): events} (hosts summed), comparable with
    naive_counts."""
    out: dict[tuple[int, bool, str], int] = {}
    for r in report.rows:
        for v, n in r.verdicts.items():
            out[(r.index, r.write, v)] = out.get((r.index, r.write, v), 0) + n
    return out


__all__ = ["replay", "report_from_summary", "verdicts_of", "filter_decider", "ReplayReport",
           "ReplayRow", "naive_counts", "report_counts"]
