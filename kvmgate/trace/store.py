"""Traces in memory (Trace) and in Parquet files (TraceWriter, TraceFile); see schema.py.

Damage is never counted silently.  A file is refused (TraceFormatError, exit 2) when it is not
Parquet, is cut short (the footer is gone: Parquet keeps its row-group index at the end, so a
cut file holds nothing readable), its footer or key summaries do not parse or disagree with the
row groups, or a page of a key column fails its checksum.

Crash safety: a TraceWriter opened with crash_safe=True (the recorder's) writes every flush as a
complete Parquet file PATH.parts/part-NNNNNN.parquet (written aside, then renamed) next to a
_RECORDING.json marker, and close() merges the parts into PATH.  A recording killed on the way
leaves the parts directory: every event up to the last flush, readable as it is by kvmgate
(reported as an unfinished recording, kvmgate.trace.sources) and by DuckDB or pandas.
"""
from __future__ import annotations

import json
import mmap
import os
import platform
import re
import shutil
import stat
import time
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import UserError
from . import fastcount
from .pagecheck import PageError, check_column_chunk
from .schema import (COLUMNS, DIRECTIONS, FORMAT, KEY_COLUMNS, META_KEY, ROW_GROUP_EVENTS, SCHEMA,
                     VERSION, WRITE_OPTIONS)
from .summary import Summary, TraceFormatError

PARTS_SUFFIX = ".parts"
MARKER = "_RECORDING.json"  # "_": Arrow datasets and DuckDB globs skip it
PART_GLOB = "part-*.parquet"
DEFAULT_FLUSH_SECONDS = 5.0
MAX_META_BYTES = 256 << 20
_VCPU_COMM = re.compile(r"^CPU (\d+)/KVM")


def vcpu_of_comm(comm: str | None) -> int:
    """QEMU names its vCPU threads "CPU n/KVM": n, else -1 (unknown)."""
    m = _VCPU_COMM.match(comm or "")
    return int(m[1]) if m and int(m[1]) < 1 << 15 else -1


def default_host() -> str:
    return platform.node() or "localhost"


# ---- columns

_EVENT_DTYPES = {"index": np.uint32, "write": bool, "value": np.uint64, "exception": bool,
                 "pid": np.int32, "vcpu": np.int16, "time_ns": np.int64}


def columns(index, write, value=None, exception=None, pid=None, time_ns=None, vcpu=None) -> dict:
    """Normalised event columns: arrays of one length, defaults (zeros; vcpu -1 = unknown)."""
    index = np.asarray(index)
    n = index.shape[0] if index.ndim == 1 else -1
    if n < 0:
        raise ValueError("index must be one-dimensional")
    if index.size and (index.min() < 0 or index.max() > 0xFFFFFFFF):
        raise ValueError("MSR index outside u32")
    out = {"index": index.astype(np.uint32, copy=False)}
    for name, a, default in (("write", write, 0), ("value", value, 0), ("exception", exception, 0),
                             ("pid", pid, 0), ("time_ns", time_ns, 0), ("vcpu", vcpu, -1)):
        if a is None:
            out[name] = np.full(n, default, _EVENT_DTYPES[name])
            continue
        a = np.asarray(a)
        if a.shape != (n,):
            raise ValueError(f"{name}: shape {a.shape}, expected ({n},)")
        out[name] = a.astype(_EVENT_DTYPES[name], copy=False)
    return out


def _concat(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def to_table(cols: dict, hosts: list[str]) -> pa.Table:
    """Event columns (host as codes into `hosts`) as an Arrow table of SCHEMA."""
    n = cols["index"].shape[0]
    vcpu = cols["vcpu"]
    return pa.Table.from_arrays([
        pa.array(cols["index"], pa.uint32()),
        pa.DictionaryArray.from_arrays(pa.array(cols["write"].astype(np.int8)), pa.array(DIRECTIONS)),
        pa.array(cols["value"], pa.uint64()),
        pa.array(cols["exception"], pa.bool_()),
        pa.array(cols["pid"], pa.int32()),
        pa.array(vcpu, pa.int16(), mask=vcpu < 0),
        pa.array(cols["time_ns"], pa.int64()),
        pa.DictionaryArray.from_arrays(pa.array(cols["host"].astype(np.int32), pa.int32()),
                                       pa.array(hosts or [""], pa.string())),
    ], schema=SCHEMA) if n else SCHEMA.empty_table()


def from_table(t: pa.Table, where: str, default_host_name: str) -> tuple[dict, list[str]]:
    """Event columns and host names of an Arrow table (ours or another tool's); TraceFormatError
    for missing columns, wrong types, nulls where there may be none, unknown directions."""
    def col(name, typ, required=True):
        if name not in t.column_names:
            if required:
                raise TraceFormatError(f"no column {name!r}", where)
            return None
        c = t.column(name)
        if pa.types.is_dictionary(c.type):
            c = c.cast(c.type.value_type)
        if c.null_count and name != "vcpu":
            raise TraceFormatError(f"column {name!r} has nulls", where)
        try:
            return c.cast(typ)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise TraceFormatError(f"column {name!r}: {str(e).splitlines()[0]}", where) from None
    n = t.num_rows
    index = col("index", pa.uint32()).to_numpy()
    d = col("direction", pa.string())
    write = pc.equal(d, "write").to_numpy(zero_copy_only=False).astype(bool)
    if n and not pc.all(pc.is_in(d, pa.array(DIRECTIONS))).as_py():
        raise TraceFormatError("column 'direction': values other than read/write", where)

    def opt(name, typ, fill):
        c = col(name, typ, required=False)
        if c is None:
            return np.full(n, fill, _EVENT_DTYPES[name])
        if name == "vcpu":
            c = pc.fill_null(c, -1)
        return c.to_numpy(zero_copy_only=False).astype(_EVENT_DTYPES[name])
    cols = {"index": index, "write": write, "value": opt("value", pa.uint64(), 0),
            "exception": opt("exception", pa.bool_(), False), "pid": opt("pid", pa.int32(), 0),
            "vcpu": opt("vcpu", pa.int16(), -1), "time_ns": opt("time_ns", pa.int64(), 0)}
    h = col("host", pa.string(), required=False)
    if h is None:
        cols["host"] = np.zeros(n, np.int32)
        return cols, [default_host_name]
    enc = pc.dictionary_encode(h).combine_chunks() if n else None
    if enc is None:
        cols["host"] = np.zeros(0, np.int32)
        return cols, []
    cols["host"] = enc.indices.to_numpy(zero_copy_only=False).astype(np.int32)
    return cols, [str(x) for x in enc.dictionary.to_pylist()]


# ---- in memory

class Trace:
    """kvm_msr events in memory: columns (see columns()), host names, metadata."""

    def __init__(self, cols: dict | None = None, hosts: list[str] | None = None, meta: dict | None = None):
        if cols is None:
            cols = columns(np.zeros(0, np.uint32), None)
            cols["host"] = np.zeros(0, np.int32)
        self.cols = cols
        self.hosts = list(hosts or [])
        self.meta = dict(meta or {})

    @classmethod
    def from_arrays(cls, index, write, value=None, exception=None, pid=None, time_ns=None, *,
                    vcpu=None, host: str | None = None, meta: dict | None = None) -> "Trace":
        cols = columns(index, write, value, exception, pid, time_ns, vcpu)
        cols["host"] = np.zeros(cols["index"].shape[0], np.int32)
        return cls(cols, [host or default_host()], meta)

    def __len__(self) -> int:
        return int(self.cols["index"].shape[0])

    def __repr__(self) -> str:
        return f"<Trace {len(self)} events, hosts {self.hosts}>"

    def __getattr__(self, name):
        cols = self.__dict__.get("cols")
        if cols is not None and name in cols and name != "host":
            return cols[name]
        raise AttributeError(name)

    def events(self) -> Iterator[tuple[int, int, int, bool, int, bool]]:
        """(time_ns, pid, index, write, value, exception) per event, in order (slow; for people)."""
        c = self.cols
        yield from zip(c["time_ns"].tolist(), c["pid"].tolist(), c["index"].tolist(),
                       c["write"].tolist(), c["value"].tolist(), c["exception"].tolist())

    def summary(self) -> Summary:
        return Summary.from_columns(self.cols, self.hosts)

    def save(self, path, *, row_group_events: int = ROW_GROUP_EVENTS) -> Path:
        """Write as a Parquet trace file."""
        with TraceWriter(path, meta=self.meta, row_group_events=row_group_events) as w:
            w.append_columns(self.cols, self.hosts)
        return Path(path)


def concat(traces: list[Trace], meta: dict | None = None) -> Trace:
    """One trace of several (hosts matched by name), in the given order."""
    hosts: dict[str, int] = {}
    parts = []
    for t in traces:
        remap = np.array([hosts.setdefault(h, len(hosts)) for h in t.hosts] or [0], np.int32)
        c = dict(t.cols)
        c["host"] = remap[c["host"]] if len(t) else c["host"]
        parts.append(c)
    if not parts:
        return Trace(meta=meta)
    return Trace(_concat(parts), list(hosts), meta if meta is not None else dict(traces[0].meta))


# ---- writing

def _doc_crc(doc: dict) -> int:
    body = {k: v for k, v in doc.items() if k != "crc"}
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (set, frozenset, tuple)):
        return sorted(o) if isinstance(o, (set, frozenset)) else list(o)
    return str(o)


class _ParquetOut:
    """One Parquet trace file being written: row groups with their summaries, then the footer
    with the kvmgate document (written aside and renamed into place by close())."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.meta = meta
        self.summaries: list[dict] = []
        self.rows: list[int] = []
        self.w = pq.ParquetWriter(self.tmp, SCHEMA, **WRITE_OPTIONS)

    def write_group(self, cols: dict, hosts: list[str], summary: dict | None = None) -> None:
        n = int(cols["index"].shape[0])
        if not n:
            return
        self.w.write_table(to_table(cols, hosts), row_group_size=n)
        self.summaries.append(summary if summary is not None else Summary.from_columns(cols, hosts).to_json())
        self.rows.append(n)

    def close(self) -> None:
        doc = {"format": FORMAT, "version": VERSION, "events": sum(self.rows),
               "row_groups": len(self.rows), "rows": self.rows, "meta": self.meta,
               "summaries": self.summaries}
        doc = json.loads(json.dumps(doc, default=_json_default))
        doc["crc"] = _doc_crc(doc)
        self.w.add_key_value_metadata({META_KEY: json.dumps(doc, separators=(",", ":"))})
        self.w.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.w.close()
        finally:
            self.tmp.unlink(missing_ok=True)


class TraceWriter:
    """Stream events into a Parquet trace at `path`, row_group_events at a time (bounded memory).

    crash_safe=False: one file, written aside and renamed into place by close().
    crash_safe=True: every flush (a full row group, or flush() / flush_due() after
    `flush_seconds`) becomes a part file in PATH.parts/; close() merges them into PATH (see the
    module docstring).  `meta` may be updated until close().  Leaving the `with` block with an
    exception still closes the file, keeping what was appended.
    """

    def __init__(self, path, *, meta: dict | None = None, host: str | None = None,
                 row_group_events: int = ROW_GROUP_EVENTS, crash_safe: bool = False,
                 flush_seconds: float = DEFAULT_FLUSH_SECONDS):
        if not 1 <= row_group_events <= 1 << 26:
            raise ValueError("row_group_events: 1 .. 2**26")
        self.path = Path(path)
        self.meta = dict(meta or {})
        self.host = host or default_host()
        self.row_group_events = int(row_group_events)
        self.crash_safe = crash_safe
        self.flush_seconds = flush_seconds
        self.events = 0
        self._hosts: dict[str, int] = {}
        self._pending: list[dict] = []
        self._npending = 0
        self._last_flush = time.monotonic()
        self._parts = 0
        self._closed = False
        if crash_safe:
            self.parts_dir = self.path.with_name(self.path.name + PARTS_SUFFIX)
            if self.parts_dir.exists():
                raise UserError(f"{self.parts_dir} exists (an unfinished recording? replay it with "
                                "--accept-partial, or remove it)", str(self.path))
            self.parts_dir.mkdir()
            (self.parts_dir / MARKER).write_text(json.dumps(
                {"format": FORMAT, "out": self.path.name, "recorder_pid": os.getpid(),
                 "host": self.host, "started_unix": time.time()}))
            self._out = None
        else:
            self._out = _ParquetOut(self.path, self.meta)

    def __enter__(self):
        return self

    def __exit__(self, etype, *exc):
        if etype is not None and not self.events:
            self.discard()                  # failed before any event: leave nothing behind
        else:
            self.close()

    def discard(self) -> None:
        """Drop everything: no file, no parts."""
        if self._closed:
            return
        self._closed = True
        if self.crash_safe:
            shutil.rmtree(self.parts_dir, ignore_errors=True)
        else:
            self._out.abort()

    def append(self, index, write, value=None, exception=None, pid=None, time_ns=None, vcpu=None,
               host: str | None = None) -> None:
        """Append equal-length columns (all from one host, default this writer's)."""
        cols = columns(index, write, value, exception, pid, time_ns, vcpu)
        cols["host"] = np.full(cols["index"].shape[0], self._host_code(host or self.host), np.int32)
        self._add(cols)

    def append_columns(self, cols: dict, hosts: list[str]) -> None:
        """Append columns as Trace holds them (host codes into `hosts`)."""
        n = int(cols["index"].shape[0])
        if not n:
            return
        remap = np.array([self._host_code(h) for h in hosts], np.int32)
        c = dict(cols)
        c["host"] = remap[cols["host"]]
        self._add(c)

    def _host_code(self, host: str) -> int:
        return self._hosts.setdefault(host, len(self._hosts))

    def _add(self, cols: dict) -> None:
        n = int(cols["index"].shape[0])
        if not n:
            return
        self._pending.append(cols)
        self._npending += n
        self.events += n
        if self._npending >= self.row_group_events:
            self._flush(final=False)
        elif self.crash_safe:
            self.flush_due()

    def flush_due(self) -> None:
        """Flush if `flush_seconds` passed since the last flush (crash_safe writers)."""
        if self._npending and time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write every pending event now (a part file when crash_safe)."""
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        self._last_flush = time.monotonic()
        if not self._npending:
            return
        cols = _concat(self._pending)
        n = cols["index"].shape[0]
        full = n if final else n - n % self.row_group_events
        hosts = list(self._hosts)
        for lo in range(0, full, self.row_group_events):
            group = {k: v[lo:min(full, lo + self.row_group_events)] for k, v in cols.items()}
            if self.crash_safe:
                self._write_part(group, hosts)
            else:
                self._out.write_group(group, hosts)
        self._pending = [{k: v[full:] for k, v in cols.items()}] if full < n else []
        self._npending = n - full

    def _write_part(self, group: dict, hosts: list[str]) -> None:
        self._parts += 1
        out = _ParquetOut(self.parts_dir / f"part-{self._parts:06d}.parquet",
                          dict(self.meta, part=self._parts))
        try:
            out.write_group(group, hosts)
            out.close()
        except BaseException:
            out.abort()
            raise

    def close(self) -> None:
        """Write what is pending and finish the file (merging the parts); idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self.crash_safe:
            try:
                self._flush(final=True)
                self._out.close()
            except BaseException:
                self._out.abort()
                raise
            return
        self._flush(final=True)
        out = _ParquetOut(self.path, self.meta)
        try:
            merge_parts(sorted(self.parts_dir.glob(PART_GLOB)), out, self.row_group_events)
            out.close()
        except BaseException:
            out.abort()
            raise
        shutil.rmtree(self.parts_dir)


def merge_parts(parts: list[Path], out: _ParquetOut, row_group_events: int) -> None:
    """Copy the events of part files into `out`, regrouped into row groups of up to
    row_group_events (each part is checked as it is read)."""
    pending: list[dict] = []
    npending = 0
    hosts: dict[str, int] = {}

    def emit(final):
        nonlocal pending, npending
        if not npending:
            return
        cols = _concat(pending)
        n = cols["index"].shape[0]
        full = n if final else n - n % row_group_events
        for lo in range(0, full, row_group_events):
            out.write_group({k: v[lo:min(full, lo + row_group_events)] for k, v in cols.items()}, list(hosts))
        pending = [{k: v[full:] for k, v in cols.items()}] if full < n else []
        npending = n - full

    for p in parts:
        t = TraceFile(p).read()
        remap = np.array([hosts.setdefault(h, len(hosts)) for h in t.hosts] or [0], np.int32)
        c = dict(t.cols)
        c["host"] = remap[c["host"]] if len(t) else c["host"]
        pending.append(c)
        npending += len(t)
        if npending >= row_group_events:
            emit(False)
    emit(True)


# ---- reading

def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


class TraceFile:
    """One Parquet trace file, opened and checked (footer, schema, the kvmgate document).

    summary() counts from the stored key summaries after checking the key columns' page
    checksums; summary(full=True) checks every page's checksum and counts the key columns, which
    must agree with the stored summaries (kvmgate.trace.fastcount); a file without kvmgate's
    document is always decoded event by event.  read() loads every event.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.where = str(self.path)
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise TraceFormatError(f"cannot read trace: {e.strerror}", self.where) from None
        if stat.S_ISDIR(st.st_mode):
            raise TraceFormatError("is a directory (give the directory to trace replay, which reads "
                                   "every trace in it)", self.where)
        if not stat.S_ISREG(st.st_mode):
            raise TraceFormatError("not a regular file", self.where)
        self.size = st.st_size
        try:
            with open(self.path, "rb") as fh:
                head = fh.read(4)
                fh.seek(max(0, self.size - 4))
                tail = fh.read(4)
        except OSError as e:
            raise TraceFormatError(f"cannot read trace: {e.strerror}", self.where) from None
        if head != b"PAR1":
            raise TraceFormatError("not a Parquet trace file (no PAR1 magic)", self.where)
        if self.size < 12 or tail != b"PAR1":
            raise TraceFormatError(
                f"truncated: {self.size} bytes and no Parquet footer (the file was cut short?); "
                "Parquet keeps its index of row groups in the footer, so nothing in this file can be "
                "recovered; an unfinished recording keeps its events in its .parts directory",
                self.where)
        try:
            self.pf = pq.ParquetFile(self.path, page_checksum_verification=True, memory_map=False)
            self.md = self.pf.metadata
            schema = self.pf.schema_arrow
        except Exception as e:  # noqa: BLE001 - any footer damage: pyarrow raises OSError, ArrowInvalid, ...
            raise TraceFormatError(f"damaged Parquet footer: {_first_line(e)}", self.where) from None
        missing = {"index", "direction"} - set(schema.names)
        if missing:
            raise TraceFormatError(f"not a trace: no column {', '.join(sorted(missing))}", self.where)
        self.events = self.md.num_rows
        self.row_groups = self.md.num_row_groups
        self.doc = self._document()
        self.meta = self.doc["meta"] if self.doc else {"source": "parquet (not written by kvmgate)"}
        self.partial = False

    def _document(self) -> dict | None:
        kv = self.md.metadata or {}
        raw = kv.get(META_KEY)
        if raw is None:
            return None
        bad = lambda what: TraceFormatError(f"damaged kvmgate metadata: {what}", self.where)  # noqa: E731
        if len(raw) > MAX_META_BYTES:
            raise bad("too large")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise bad("not JSON") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise bad("not a kvmgate trace document")
        if doc.get("version") != VERSION:
            raise TraceFormatError(f"kvmgate trace version {doc.get('version')!r}; this kvmgate reads "
                                   f"version {VERSION}", self.where)
        if type(doc.get("crc")) is not int or doc["crc"] != _doc_crc(doc):
            raise bad("checksum mismatch")
        rows = doc.get("rows")
        if (doc.get("events") != self.events or doc.get("row_groups") != self.row_groups
                or not isinstance(rows, list) or len(rows) != self.row_groups
                or not isinstance(doc.get("summaries"), list) or len(doc["summaries"]) != self.row_groups
                or not isinstance(doc.get("meta"), dict)):
            raise bad(f"it says {doc.get('events')!r} events in {doc.get('row_groups')!r} row groups, "
                      f"the file has {self.events} in {self.row_groups}")
        for i in range(self.row_groups):
            if rows[i] != self.md.row_group(i).num_rows:
                raise bad(f"row group {i}: {rows[i]!r} events recorded, {self.md.row_group(i).num_rows} found")
        return doc

    @property
    def foreign(self) -> bool:
        """Written by another tool (no kvmgate document): read event by event."""
        return self.doc is None

    def __repr__(self) -> str:
        return f"<TraceFile {self.path}: {self.events} events in {self.row_groups} row groups>"

    def stored_summaries(self) -> list[Summary]:
        return [Summary.from_json(s, f"{self.where}: row group {i}")
                for i, s in enumerate(self.doc["summaries"])]

    def check_key_pages(self) -> None:
        """The page checksums of the key columns of every row group (no decoding)."""
        names = self.pf.schema_arrow.names
        want = [names.index(c) for c in KEY_COLUMNS if c in names]
        try:
            with open(self.path, "rb") as fh:
                with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                    for g in range(self.row_groups):
                        rg = self.md.row_group(g)
                        for c in want:
                            cc = rg.column(c)
                            start = cc.dictionary_page_offset if cc.has_dictionary_page else cc.data_page_offset
                            n = check_column_chunk(mm, int(start), int(cc.total_compressed_size))
                            if n != rg.num_rows or cc.num_values != rg.num_rows:
                                raise PageError(f"{n} values in the pages, {rg.num_rows} rows")
        except PageError as e:
            raise TraceFormatError(f"damaged: row group {g}, column {names[c]!r}: {e}", self.where) from None
        except (OSError, ValueError) as e:
            raise TraceFormatError(f"cannot check pages: {_first_line(e)}", self.where) from None

    def iter_groups(self) -> Iterator[tuple[dict, list[str]]]:
        """(columns, hosts) per row group, decoded with page checksums verified."""
        for g in range(self.row_groups):
            try:
                # page headers are not covered by the page checksums: a damaged one can decode to
                # arrays that break Arrow's invariants (e.g. dictionary indices out of range)
                t = self.pf.read_row_group(g, use_threads=False)
                t.validate(full=True)
                if t.num_rows != self.md.row_group(g).num_rows:
                    raise TraceFormatError(f"damaged: row group {g}: {t.num_rows} rows decoded", self.where)
                cols = from_table(t, f"{self.where}: row group {g}", self.path.stem)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - pyarrow raises OSError/ArrowInvalid/ArrowIndexError/...
                raise TraceFormatError(f"damaged: row group {g}: {_first_line(e)}", self.where) from None
            yield cols

    def summary(self, full: bool = False) -> Summary:
        if self.doc is not None and not full:
            self.check_key_pages()
            return Summary.merge(self.stored_summaries())
        if full and fastcount.applies(self):        # every page's CRC, the key columns counted
            return fastcount.verified_summary(self)
        stored = self.stored_summaries() if self.doc is not None else None
        got = []
        for g, (cols, hosts) in enumerate(self.iter_groups()):
            s = Summary.from_columns(cols, hosts)
            if stored is not None:
                _same_summary(stored[g], s, f"{self.where}: row group {g}")
            got.append(s)
        return Summary.merge(got)

    def read(self) -> Trace:
        parts = [Trace(c, h) for c, h in self.iter_groups()]
        out = concat(parts, dict(self.meta))
        if not len(out) and not out.hosts and self.doc is None:
            out.hosts = [self.path.stem]
        return out


def _same_summary(stored: Summary, got: Summary, where: str) -> None:
    sk = Summary.merge([stored])
    if (len(sk) != len(got) or sk.hosts != got.hosts or not np.array_equal(sk.keys, got.keys)
            or not np.array_equal(sk.count, got.count)):
        raise TraceFormatError("damaged: the events disagree with the stored key summary", where)


__all__ = ["Trace", "TraceWriter", "TraceFile", "TraceFormatError", "columns", "concat",
           "to_table", "from_table", "vcpu_of_comm", "default_host", "merge_parts",
           "PARTS_SUFFIX", "MARKER", "COLUMNS"]
