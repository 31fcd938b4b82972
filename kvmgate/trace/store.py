"""Columnar, dictionary-encoded, chunked storage for kvm:kvm_msr events (a `.kvmtrace` file).

One file, laid out like Parquet (all integers little-endian):

    "KVMTRACE" u32 version u32 0                        file header, 16 bytes
    per chunk:  "KVMCHUNK" u32 header_len u32 0, JSON header, zero padding to 64 bytes,
                then the chunk's columns, each at a 64-byte-aligned offset named in the header
    JSON footer (every chunk header plus its offset, and the trace's metadata)
    u64 footer_len, "KVMTEND1"

A chunk's *dictionary* lists its distinct (index, write, exception) keys, sorted, with per-key
statistics (event count, first and last time, the pids seen); each event stores only a u16 code
into it (u32 past 65536 keys) plus its value, pid and time.  Readers mmap the file, so only the
columns a consumer touches leave the disk and traces larger than memory stream chunk by chunk.
A file whose writer was killed (no footer) is recovered by walking the chunk headers.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..errors import UserError

MAGIC, END_MAGIC, CHUNK_MAGIC = b"KVMTRACE", b"KVMTEND1", b"KVMCHUNK"
VERSION = 1
ALIGN = 64
DEFAULT_CHUNK_EVENTS = 1 << 21          # 2 Mi events: ~44 MiB of columns per chunk
MAX_CHUNK_EVENTS = 1 << 26
U64_MAX = np.iinfo(np.uint64).max
_PREFIX = struct.Struct("<8sII")
_TAIL = struct.Struct("<Q8s")

# column name -> dtype; codes are u16 or u32 (per chunk)
DICT_COLUMNS = {"key_index": "<u4", "key_write": "u1", "key_exception": "u1", "key_count": "<u8",
                "key_first_ns": "<u8", "key_last_ns": "<u8", "pair_key": "<u4", "pair_pid": "<i4"}
EVENT_COLUMNS = {"value": "<u8", "pid": "<i4", "time_ns": "<u8"}


class TraceFormatError(UserError):
    """A trace file that is not a kvmtrace file, or is damaged."""


def key64(index, write, exception) -> np.ndarray:
    """Pack (index, write, exception) into one sortable u64: index | write << 32 | exception << 33."""
    return (np.asarray(index, np.uint64) | (np.asarray(write, np.uint64) << np.uint64(32))
            | (np.asarray(exception, np.uint64) << np.uint64(33)))


def unpack_key64(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keys = np.asarray(keys, np.uint64)
    return ((keys & np.uint64(0xFFFFFFFF)).astype(np.uint32),
            ((keys >> np.uint64(32)) & np.uint64(1)).astype(bool),
            ((keys >> np.uint64(33)) & np.uint64(1)).astype(bool))


@dataclass(eq=False)
class Chunk:
    """Up to a few million events: a dictionary of distinct keys and one code per event."""
    key_index: np.ndarray      # u32[k], sorted together with key_write, key_exception
    key_write: np.ndarray      # u8[k]
    key_exception: np.ndarray  # u8[k]
    key_count: np.ndarray      # u64[k] events per key
    key_first_ns: np.ndarray   # u64[k]
    key_last_ns: np.ndarray    # u64[k]
    pair_key: np.ndarray       # u32[m]: (key, pid) pairs that occur, sorted
    pair_pid: np.ndarray       # i32[m]
    codes: np.ndarray          # u16[n] or u32[n]: index into the dictionary
    value: np.ndarray          # u64[n]
    pid: np.ndarray            # i32[n]: the thread id (tracepoint common_pid)
    time_ns: np.ndarray        # u64[n]

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    @property
    def nkeys(self) -> int:
        return int(self.key_index.shape[0])

    def keys64(self) -> np.ndarray:
        return key64(self.key_index, self.key_write, self.key_exception)

    # decoded columns: one gather through the dictionary
    @property
    def index(self) -> np.ndarray:
        return self.key_index[self.codes]

    @property
    def write(self) -> np.ndarray:
        return self.key_write.view(bool)[self.codes]

    @property
    def exception(self) -> np.ndarray:
        return self.key_exception.view(bool)[self.codes]

    @classmethod
    def encode(cls, index, write, value, exception, pid, time_ns) -> "Chunk":
        """Dictionary-encode equal-length columns (np.unique + searchsorted, no per-event Python)."""
        keys = key64(index, write, exception)
        n = keys.shape[0]
        uniq = np.unique(keys)
        inv = np.searchsorted(uniq, keys)
        k = uniq.shape[0]
        time_ns = np.ascontiguousarray(time_ns, np.uint64)
        pid = np.ascontiguousarray(pid, np.int32)
        first = np.full(k, U64_MAX, np.uint64)
        last = np.zeros(k, np.uint64)
        if n:
            np.minimum.at(first, inv, time_ns)
            np.maximum.at(last, inv, time_ns)
        pairs = np.unique((inv.astype(np.uint64) << np.uint64(32)) | pid.view(np.uint32))
        ki, kw, ke = unpack_key64(uniq)
        return cls(ki, kw.view(np.uint8), ke.view(np.uint8),
                   np.bincount(inv, minlength=k).astype(np.uint64), first, last,
                   (pairs >> np.uint64(32)).astype(np.uint32),
                   (pairs & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32),
                   inv.astype(np.uint16 if k <= 1 << 16 else np.uint32),
                   np.ascontiguousarray(value, np.uint64), pid, time_ns)

    def columns(self) -> dict[str, np.ndarray]:
        names = list(DICT_COLUMNS) + ["codes"] + list(EVENT_COLUMNS)
        return {name: getattr(self, name) for name in names}

    def copy(self) -> "Chunk":
        return Chunk(**{name: np.array(a) for name, a in self.columns().items()})


def _columns(index, write, value=None, exception=None, pid=None, time_ns=None) -> dict:
    """Normalise user columns: arrays of one length, defaults of zeros."""
    index = np.asarray(index)
    n = index.shape[0]
    if index.size and (index.min() < 0 or index.max() > 0xFFFFFFFF):
        raise ValueError("MSR index outside u32")

    def col(a, dtype, default=0):
        if a is None:
            return np.full(n, default, dtype)
        a = np.asarray(a)
        if a.shape != (n,):
            raise ValueError(f"column of shape {a.shape}, expected ({n},)")
        return a.astype(dtype, copy=False)

    return {"index": index.astype(np.uint32, copy=False), "write": col(write, bool),
            "value": col(value, np.uint64), "exception": col(exception, bool),
            "pid": col(pid, np.int32), "time_ns": col(time_ns, np.uint64)}


def _split(cols: dict, chunk_events: int) -> Iterator[Chunk]:
    n = cols["index"].shape[0]
    for lo in range(0, n, chunk_events):
        hi = min(n, lo + chunk_events)
        yield Chunk.encode(**{k: v[lo:hi] for k, v in cols.items()})


def _check_chunk_events(chunk_events: int) -> int:
    if not 1 <= chunk_events <= MAX_CHUNK_EVENTS:
        raise ValueError(f"chunk_events={chunk_events}: 1..{MAX_CHUNK_EVENTS}")
    return int(chunk_events)


class Trace:
    """kvm_msr events in memory, as dictionary-encoded chunks, plus metadata (`meta`)."""

    def __init__(self, chunks: Iterable[Chunk] = (), meta: dict | None = None):
        self.chunks = [c for c in chunks if len(c)]
        self.meta = dict(meta or {})

    @classmethod
    def from_arrays(cls, index, write, value=None, exception=None, pid=None, time_ns=None, *,
                    chunk_events: int = DEFAULT_CHUNK_EVENTS, meta: dict | None = None) -> "Trace":
        """A trace from per-event columns (numpy arrays or sequences)."""
        cols = _columns(index, write, value, exception, pid, time_ns)
        return cls(_split(cols, _check_chunk_events(chunk_events)), meta)

    @classmethod
    def load(cls, path) -> "Trace":
        """Read a whole .kvmtrace file into memory (use TraceReader to stream)."""
        with TraceReader(path) as r:
            return r.read()

    def __len__(self) -> int:
        return sum(len(c) for c in self.chunks)

    def __repr__(self) -> str:
        return f"<Trace {len(self)} events in {len(self.chunks)} chunks>"

    def iter_chunks(self) -> Iterator[Chunk]:
        return iter(self.chunks)

    def _cat(self, name: str, dtype) -> np.ndarray:
        if not self.chunks:
            return np.zeros(0, dtype)
        return np.concatenate([getattr(c, name) for c in self.chunks])

    @property
    def index(self) -> np.ndarray:
        return self._cat("index", np.uint32)

    @property
    def write(self) -> np.ndarray:
        return self._cat("write", bool)

    @property
    def value(self) -> np.ndarray:
        return self._cat("value", np.uint64)

    @property
    def exception(self) -> np.ndarray:
        return self._cat("exception", bool)

    @property
    def pid(self) -> np.ndarray:
        return self._cat("pid", np.int32)

    @property
    def time_ns(self) -> np.ndarray:
        return self._cat("time_ns", np.uint64)

    def events(self) -> Iterator[tuple[int, int, int, bool, int, bool]]:
        """(time_ns, pid, index, write, value, exception) per event, in order (slow; for people)."""
        for c in self.chunks:
            yield from zip(c.time_ns.tolist(), c.pid.tolist(), c.index.tolist(), c.write.tolist(),
                           c.value.tolist(), c.exception.tolist())

    def rechunk(self, chunk_events: int) -> "Trace":
        """The same events in chunks of `chunk_events`."""
        cols = {k: getattr(self, k) for k in ("index", "write", "value", "exception", "pid", "time_ns")}
        return Trace(_split(cols, _check_chunk_events(chunk_events)), self.meta)

    def save(self, path) -> Path:
        """Write as a .kvmtrace file, keeping the chunking."""
        with TraceWriter(path, meta=self.meta) as w:
            for c in self.chunks:
                w.append_chunk(c)
        return Path(path)


def _pad(n: int) -> int:
    return -n % ALIGN


class TraceWriter:
    """Stream events into a .kvmtrace file, `chunk_events` at a time (bounded memory).

    `meta` may be updated until close(); the footer is written by close(), also when the
    `with` block ends with an exception, so what was appended is kept.
    """

    def __init__(self, path, chunk_events: int = DEFAULT_CHUNK_EVENTS, meta: dict | None = None):
        self.path = Path(path)
        self.chunk_events = _check_chunk_events(chunk_events)
        self.meta = dict(meta or {})
        self._f = open(self.path, "wb")
        self._f.write(_PREFIX.pack(MAGIC, VERSION, 0))
        self._pending: list[dict] = []
        self._npending = 0
        self._chunks: list[dict] = []
        self.events = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def append(self, index, write, value=None, exception=None, pid=None, time_ns=None) -> None:
        """Append equal-length columns; full chunks are encoded and written as they fill."""
        cols = _columns(index, write, value, exception, pid, time_ns)
        n = cols["index"].shape[0]
        if not n:
            return
        self._pending.append(cols)
        self._npending += n
        self.events += n
        if self._npending >= self.chunk_events:
            self._flush(final=False)

    def append_chunk(self, chunk: Chunk) -> None:
        """Write an already encoded chunk as it is (after any pending events)."""
        self._flush(final=True)
        self._write_chunk(chunk)
        self.events += len(chunk)

    def _flush(self, final: bool) -> None:
        if not self._npending:
            return
        cols = {k: np.concatenate([p[k] for p in self._pending]) for k in self._pending[0]}
        n = cols["index"].shape[0]
        full = n if final else n - n % self.chunk_events
        for chunk in _split({k: v[:full] for k, v in cols.items()}, self.chunk_events):
            self._write_chunk(chunk)
        rest = {k: v[full:] for k, v in cols.items()}
        self._pending = [rest] if n > full else []
        self._npending = n - full

    def _write_chunk(self, chunk: Chunk) -> None:
        if not len(chunk):
            return
        f = self._f
        start = f.tell()
        cols = chunk.columns()
        layout, off = {}, 0
        for name, arr in cols.items():
            dtype = np.dtype(DICT_COLUMNS.get(name) or EVENT_COLUMNS.get(name) or arr.dtype)
            if name == "codes" and dtype not in (np.dtype("<u2"), np.dtype("<u4")):
                raise ValueError(f"codes of dtype {dtype}")
            layout[name] = [dtype.str, off, int(arr.shape[0])]
            off += arr.shape[0] * dtype.itemsize
            off += _pad(off)
        header = {"events": len(chunk), "keys": chunk.nkeys, "columns": layout,
                  "time_ns": [int(chunk.key_first_ns.min()), int(chunk.key_last_ns.max())]}
        hbytes = json.dumps(header, separators=(",", ":")).encode()
        head = _PREFIX.pack(CHUNK_MAGIC, len(hbytes), 0) + hbytes
        head += b"\0" * _pad(start + len(head))
        data_start = start + len(head)
        header["size"] = len(head) + off
        f.write(head)
        for name, arr in cols.items():
            dtype, rel, _ = layout[name]
            a = np.ascontiguousarray(arr, np.dtype(dtype))
            f.write(memoryview(a).cast("B"))
            f.write(b"\0" * _pad(a.nbytes))
        header["offset"] = start
        header["data"] = data_start
        self._chunks.append(header)

    def close(self) -> None:
        """Write pending events and the footer; idempotent."""
        if self._f is None:
            return
        try:
            self._flush(final=True)
            footer = {"format": "kvmtrace", "version": VERSION, "events": self.events,
                      "chunks": self._chunks, "meta": self.meta}
            fbytes = json.dumps(footer, separators=(",", ":"), default=_json_default).encode()
            self._f.write(fbytes)
            self._f.write(_TAIL.pack(len(fbytes), END_MAGIC))
        finally:
            self._f.close()
            self._f = None


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (set, frozenset, tuple)):
        return sorted(o) if isinstance(o, (set, frozenset)) else list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


class TraceReader:
    """A .kvmtrace file, memory-mapped: iter_chunks() yields Chunks whose columns are views of
    the file.  Pages of finished chunks are dropped from the mapping (MADV_DONTNEED), so a
    pass over a trace larger than memory keeps a bounded resident set."""

    def __init__(self, path):
        self.path = Path(path)
        self._f = open(self.path, "rb")
        try:
            size = os.fstat(self._f.fileno()).st_size
            if size < _PREFIX.size or self._f.read(8) != MAGIC:
                raise TraceFormatError(f"{self.path}: not a kvmtrace file")
            self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)
            self.recovered = False
            footer = self._footer(size)
            if footer is None:
                footer = {"chunks": self._scan(size), "meta": {"recovered": True}}
                self.recovered = True
            self._chunk_headers = footer["chunks"]
            self.meta = footer.get("meta", {})
        except BaseException:
            self.close()
            raise
        self.events = sum(h["events"] for h in self._chunk_headers)

    def _footer(self, size: int) -> dict | None:
        if size < _PREFIX.size + _TAIL.size:
            return None
        flen, magic = _TAIL.unpack_from(self._mm, size - _TAIL.size)
        if magic != END_MAGIC or flen > size - _PREFIX.size - _TAIL.size:
            return None
        try:
            footer = json.loads(self._mm[size - _TAIL.size - flen:size - _TAIL.size])
        except ValueError:
            return None
        if footer.get("format") != "kvmtrace":
            return None
        if footer.get("version") != VERSION:
            raise TraceFormatError(f"{self.path}: kvmtrace version {footer.get('version')}, "
                                   f"this kvmgate reads version {VERSION}")
        return footer

    def _scan(self, size: int) -> list[dict]:
        """Chunk headers found by walking the file (a writer died before its footer)."""
        out, pos = [], _PREFIX.size
        while pos + _PREFIX.size <= size:
            magic, hlen, _ = _PREFIX.unpack_from(self._mm, pos)
            if magic != CHUNK_MAGIC or pos + _PREFIX.size + hlen > size:
                break
            try:
                h = json.loads(self._mm[pos + _PREFIX.size:pos + _PREFIX.size + hlen])
            except ValueError:
                break
            head = _PREFIX.size + hlen
            head += _pad(pos + head)
            body = max(rel + cnt * np.dtype(dt).itemsize for dt, rel, cnt in h["columns"].values())
            if pos + head + body > size:
                break
            h.update(offset=pos, data=pos + head, size=head + body + _pad(body))
            out.append(h)
            pos += h["size"]
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self) -> int:
        return self.events

    def __repr__(self) -> str:
        return f"<TraceReader {self.path}: {self.events} events in {self.chunk_count} chunks>"

    @property
    def chunk_count(self) -> int:
        return len(self._chunk_headers)

    def _chunk(self, h: dict) -> Chunk:
        cols = {}
        for name, (dtype, rel, count) in h["columns"].items():
            cols[name] = np.frombuffer(self._mm, np.dtype(dtype), count, h["data"] + rel)
        try:
            return Chunk(**cols)
        except TypeError as e:
            raise TraceFormatError(f"{self.path}: chunk at {h['offset']}: {e}") from None

    def iter_chunks(self) -> Iterator[Chunk]:
        """Each chunk in file order, its columns mapped (not read) from the file."""
        prev = None
        for h in self._chunk_headers:
            yield self._chunk(h)
            if prev is not None:
                self._drop(prev)
            prev = h
        if prev is not None:
            self._drop(prev)

    def _drop(self, h: dict) -> None:
        """MADV_DONTNEED a finished chunk: views stay valid (pages fault back in from the file)."""
        page = mmap.PAGESIZE
        lo = h["offset"] - h["offset"] % page
        hi = h["offset"] + h["size"]
        if hasattr(self._mm, "madvise") and hi > lo:
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, lo, min(hi, len(self._mm)) - lo)
            except (OSError, ValueError):
                pass

    def read(self) -> Trace:
        """Every chunk copied into memory."""
        return Trace((c.copy() for c in self.iter_chunks()), self.meta)

    def close(self) -> None:
        mm = getattr(self, "_mm", None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass    # chunk views are still alive: the mapping goes with the last of them
            self._mm = None
        if self._f is not None:
            self._f.close()
            self._f = None


def open_trace(source) -> Trace | TraceReader:
    """A Trace or TraceReader as is; a path opens a TraceReader."""
    if hasattr(source, "iter_chunks"):
        return source
    return TraceReader(source)
