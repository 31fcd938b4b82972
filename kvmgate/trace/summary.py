"""Key summaries: what replay and learn need from a set of events, per distinct key.

A key is (host, index, write, exception).  A Summary holds, per key (rows sorted by key): the
event count, the first and last time, the threads (pids) seen, and up to SUMMARY_VALUES distinct
values (the smallest).  Summaries of row groups, files and hosts merge into one (`merge`), so a
fleet's traces reduce to one small table: the policy is then asked once per distinct key.

The writer stores one summary per row group in the file (kvmgate.trace.schema); `from_json`
checks everything it is given (types, lengths, ranges, order) and raises TraceFormatError.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

from ..errors import UserError

SUMMARY_VALUES = 4
_I64_MAX = np.iinfo(np.int64).max
_I64_MIN = np.iinfo(np.int64).min


class TraceFormatError(UserError):
    """A trace file that is not a kvmgate trace, or is damaged (exit code 2)."""


def pack_keys(host, index, write, exception) -> np.ndarray:
    """(host, index, write, exception) -> one sortable u64: host << 34 | exc << 33 | write << 32 | index."""
    return ((np.asarray(host, np.uint64) << np.uint64(34))
            | (np.asarray(exception, np.uint64) << np.uint64(33))
            | (np.asarray(write, np.uint64) << np.uint64(32)) | np.asarray(index, np.uint64))


def unpack_keys(keys: np.ndarray):
    keys = np.asarray(keys, np.uint64)
    return ((keys >> np.uint64(34)).astype(np.int32), (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32),
            ((keys >> np.uint64(32)) & np.uint64(1)).astype(bool),
            ((keys >> np.uint64(33)) & np.uint64(1)).astype(bool))


def _group_starts(sorted_codes: np.ndarray) -> np.ndarray:
    if not sorted_codes.shape[0]:
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.concatenate([[True], sorted_codes[1:] != sorted_codes[:-1]]))


def _distinct_sorted(a: np.ndarray) -> np.ndarray:
    """np.unique(a) for arrays with few distinct values: hashed (numpy >= 2.3), then sorted."""
    try:
        return np.sort(np.unique(a, sorted=False))
    except TypeError:                                       # numpy < 2.3: sort them all
        return np.unique(a)


def _smallest_values(rows: np.ndarray, starts: np.ndarray, v: np.ndarray):
    """(row, value) for the SUMMARY_VALUES smallest distinct values of each group (`rows` and
    `v` sorted by group, groups starting at `starts`): SUMMARY_VALUES minimum passes."""
    avail = np.ones(v.shape[0], bool)
    out_r, out_v = [], []
    u64max = np.uint64(np.iinfo(np.uint64).max)
    for _ in range(SUMMARY_VALUES):
        has = np.logical_or.reduceat(avail, starts)
        if not has.any():
            break
        m = np.minimum.reduceat(np.where(avail, v, u64max), starts)
        out_r.append(np.flatnonzero(has))
        out_v.append(m[has])
        avail &= v != m[rows]
    if not out_r:
        return np.zeros(0, np.int64), np.zeros(0, np.uint64)
    r, vals = np.concatenate(out_r), np.concatenate(out_v)
    o = np.lexsort((vals, r))
    return r[o].astype(np.int64), vals[o]


def _smallest_values_by_row(rows: np.ndarray, v: np.ndarray, nrows: int):
    """(row, value) for the SUMMARY_VALUES smallest distinct values per row, rows in any order."""
    if not rows.shape[0]:
        return np.zeros(0, np.int64), np.zeros(0, np.uint64)
    order = np.argsort(rows.astype(np.uint16 if nrows <= 1 << 16 else np.int64), kind="stable")
    r, vs = rows[order], v[order]
    new = np.concatenate([[True], r[1:] != r[:-1]])
    starts = np.flatnonzero(new)
    group = np.cumsum(new) - 1
    g, vals = _smallest_values(group, starts, vs)
    return r[starts][g].astype(np.int64), vals


@dataclass(eq=False)
class Summary:
    hosts: list[str]
    keys: np.ndarray          # u64[k] pack_keys(...), sorted, distinct
    count: np.ndarray         # i64[k]
    first_ns: np.ndarray      # i64[k]
    last_ns: np.ndarray       # i64[k]
    pid_row: np.ndarray       # i64[m] row of keys, sorted with pid
    pid: np.ndarray           # i32[m]
    value_row: np.ndarray     # i64[v]
    value: np.ndarray         # u64[v]

    @property
    def events(self) -> int:
        return int(self.count.sum())

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def columns(self):
        """(host, index, write, exception) arrays, one entry per key."""
        return unpack_keys(self.keys)

    @classmethod
    def empty(cls) -> "Summary":
        z = np.zeros(0, np.int64)
        return cls([], np.zeros(0, np.uint64), z, z, z, z, np.zeros(0, np.int32), z, np.zeros(0, np.uint64))

    @classmethod
    def from_columns(cls, cols: dict, hosts: list[str]) -> "Summary":
        """Summarise events: cols has index, write, exception, value, pid, time_ns, host (codes
        into `hosts`), equal-length arrays."""
        keys = pack_keys(cols["host"], cols["index"], cols["write"], cols["exception"])
        if not keys.shape[0]:
            return cls.empty()
        if int(np.max(cols["host"])) >= len(hosts) or int(np.min(cols["host"])) < 0:
            raise ValueError("host code without a host name")
        # few distinct keys: find them by hashing, then a radix (counting) sort of their codes
        uniq = _distinct_sorted(keys)
        code = np.searchsorted(uniq, keys)
        code = code.astype(np.uint16 if uniq.shape[0] <= 1 << 16 else np.int64)
        order = np.argsort(code, kind="stable")
        row_of_sorted = code[order].astype(np.int64)
        count = np.bincount(row_of_sorted, minlength=uniq.shape[0]).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
        t = np.asarray(cols["time_ns"], np.int64)[order]
        first = np.minimum.reduceat(t, starts)
        last = np.maximum.reduceat(t, starts)
        packed = _distinct_sorted((row_of_sorted.astype(np.uint64) << np.uint64(32))
                                  | np.asarray(cols["pid"], np.int32)[order].view(np.uint32))
        pr = (packed >> np.uint64(32)).astype(np.int64)
        pv = (packed & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)
        vr, vv = _smallest_values(row_of_sorted, starts, np.asarray(cols["value"], np.uint64)[order])
        raw = cls(list(hosts), uniq, count, first.astype(np.int64), last.astype(np.int64),
                  pr, pv.astype(np.int32), vr, vv.astype(np.uint64))
        return cls.merge([raw])

    @classmethod
    def merge(cls, parts) -> "Summary":
        """One summary of many.  Hosts are matched by name and numbered in sorted order (names no
        key uses are dropped), so equal events give equal summaries however they were split."""
        parts = [p for p in parts if p is not None and len(p)]
        names = sorted({p.hosts[h] for p in parts for h in np.unique(p.keys >> np.uint64(34)).tolist()})
        code = {h: i for i, h in enumerate(names)}
        keys, counts, firsts, lasts, prow, pids, vrow, vals = [], [], [], [], [], [], [], []
        base = 0
        for p in parts:
            remap = np.array([code.get(h, 0) for h in p.hosts], np.uint64)
            h = (p.keys >> np.uint64(34)).astype(np.int64)
            keys.append((remap[h] << np.uint64(34)) | (p.keys & np.uint64((1 << 34) - 1)))
            counts.append(p.count)
            firsts.append(p.first_ns)
            lasts.append(p.last_ns)
            prow.append(p.pid_row + base)
            pids.append(p.pid)
            vrow.append(p.value_row + base)
            vals.append(p.value)
            base += len(p)
        if not base:
            return cls.empty()
        uniq, inv = np.unique(np.concatenate(keys), return_inverse=True)
        k = uniq.shape[0]
        count = np.zeros(k, np.int64)
        np.add.at(count, inv, np.concatenate(counts))
        first = np.full(k, _I64_MAX, np.int64)
        np.minimum.at(first, inv, np.concatenate(firsts))
        last = np.full(k, _I64_MIN, np.int64)
        np.maximum.at(last, inv, np.concatenate(lasts))
        packed = _distinct_sorted((inv[np.concatenate(prow)].astype(np.uint64) << np.uint64(32))
                                  | np.concatenate(pids).astype(np.int32).view(np.uint32))
        pr = (packed >> np.uint64(32)).astype(np.int64)
        pv = (packed & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)
        vr, vv = _smallest_values_by_row(inv[np.concatenate(vrow)], np.concatenate(vals).astype(np.uint64), k)
        return cls(names, uniq, count, first, last, pr, pv.astype(np.int32), vr, vv.astype(np.uint64))

    def only_host(self, host: str) -> "Summary":
        """The keys of one host."""
        if host not in self.hosts:
            return Summary.empty()
        h = self.hosts.index(host)
        sel = np.flatnonzero((self.keys >> np.uint64(34)) == np.uint64(h))
        new = np.full(len(self), -1, np.int64)
        new[sel] = np.arange(sel.shape[0])
        pm = new[self.pid_row] >= 0
        vm = new[self.value_row] >= 0
        return Summary([host], self.keys[sel] & np.uint64((1 << 34) - 1), self.count[sel],
                       self.first_ns[sel], self.last_ns[sel], new[self.pid_row][pm], self.pid[pm],
                       new[self.value_row][vm], self.value[vm])

    def pids_of(self) -> list[tuple[int, ...]]:
        """Per key row, the pids seen."""
        bounds = np.searchsorted(self.pid_row, np.arange(len(self) + 1))
        pl = self.pid.tolist()
        return [tuple(pl[bounds[i]:bounds[i + 1]]) for i in range(len(self))]

    def values_of(self) -> list[tuple[int, ...]]:
        bounds = np.searchsorted(self.value_row, np.arange(len(self) + 1))
        vl = self.value.tolist()
        return [tuple(vl[bounds[i]:bounds[i + 1]]) for i in range(len(self))]

    # ---- JSON (the form stored in the file): host names, then each array as base64 of its
    # little-endian bytes (JSON_ARRAYS gives the dtypes)

    def to_json(self) -> dict:
        d = {"hosts": list(self.hosts)}
        for name, dtype in JSON_ARRAYS.items():
            d[name] = base64.b64encode(np.ascontiguousarray(getattr(self, name), dtype).tobytes()).decode()
        return d

    @classmethod
    def from_json(cls, d, where: str) -> "Summary":
        """A summary from its JSON form, every field checked (TraceFormatError names `where`)."""
        def bad(what):
            return TraceFormatError(f"damaged key summary: {what}", where)
        if not isinstance(d, dict) or set(d) != {"hosts", *JSON_ARRAYS}:
            raise bad("fields")
        hosts = d["hosts"]
        if (not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts)
                or hosts != sorted(set(hosts)) or len(hosts) > 1 << 30):
            raise bad("hosts")
        arr = {}
        for name, dtype in JSON_ARRAYS.items():
            v = d[name]
            if not isinstance(v, str):
                raise bad(name)
            try:
                raw = base64.b64decode(v, validate=True)
            except (ValueError, TypeError):
                raise bad(name) from None
            if len(raw) % np.dtype(dtype).itemsize:
                raise bad(name)
            arr[name] = np.frombuffer(raw, dtype).astype(np.dtype(dtype).newbyteorder("="))
        keys, k = arr["keys"], arr["keys"].shape[0]
        if any(arr[n].shape[0] != k for n in ("count", "first_ns", "last_ns")):
            raise bad("columns of different lengths")
        if arr["pid_row"].shape != arr["pid"].shape or arr["value_row"].shape != arr["value"].shape:
            raise bad("pid/value lists")
        if k and (int((keys[-1] >> np.uint64(34))) >= len(hosts) or np.any(keys[1:] <= keys[:-1])):
            raise bad("keys not sorted, distinct and of known hosts")
        if np.any(arr["count"] < 1) or np.any(arr["first_ns"] > arr["last_ns"]):
            raise bad("counts or times")
        for rows in (arr["pid_row"], arr["value_row"]):
            if rows.shape[0] and (np.any(rows < 0) or np.any(rows >= k) or np.any(rows[1:] < rows[:-1])):
                raise bad("pid/value rows")
        return cls(list(hosts), keys, arr["count"], arr["first_ns"], arr["last_ns"],
                   arr["pid_row"].astype(np.int64), arr["pid"], arr["value_row"].astype(np.int64),
                   arr["value"])


JSON_ARRAYS = {"keys": "<u8", "count": "<i8", "first_ns": "<i8", "last_ns": "<i8",
               "pid_row": "<i8", "pid": "<i4", "value_row": "<i8", "value": "<u8"}


__all__ = ["Summary", "TraceFormatError", "SUMMARY_VALUES", "pack_keys", "unpack_keys"]
