"""Writing traces: TraceWriter streams events into a Parquet trace file, bounded memory.

Crash safety: a TraceWriter opened with crash_safe=True (the recorder's) writes every flush as a
complete Parquet file PATH.parts/part-NNNNNN.parquet (written aside, then renamed) next to a
_RECORDING.json marker, and close() merges the parts into PATH.  A recording killed on the way
leaves the parts directory: every event up to the last flush, readable as it is by kvmgate
(reported as an unfinished recording, kvmgate.trace.sources) and by DuckDB or pandas.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from ..errors import UserError
from .columns import columns, concat_columns, default_host
from .parquet_out import ParquetOut
from .reading import TraceFile
from .schema import FORMAT, ROW_GROUP_EVENTS

PARTS_SUFFIX = ".parts"
MARKER = "_RECORDING.json"  # "_": Arrow datasets and DuckDB globs skip it
PART_GLOB = "part-*.parquet"
DEFAULT_FLUSH_SECONDS = 5.0


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
            self._out = ParquetOut(self.path, self.meta)

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
        cols = concat_columns(self._pending)
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
        out = ParquetOut(self.parts_dir / f"part-{self._parts:06d}.parquet",
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
        out = ParquetOut(self.path, self.meta)
        try:
            merge_parts(sorted(self.parts_dir.glob(PART_GLOB)), out, self.row_group_events)
            out.close()
        except BaseException:
            out.abort()
            raise
        shutil.rmtree(self.parts_dir)


def merge_parts(parts: list[Path], out: ParquetOut, row_group_events: int) -> None:
    """Copy the events of part files into `out`, regrouped into row groups of up to
    row_group_events (each part is checked as it is read)."""
    pending: list[dict] = []
    npending = 0
    hosts: dict[str, int] = {}

    def emit(final):
        nonlocal pending, npending
        if not npending:
            return
        cols = concat_columns(pending)
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


__all__ = ["TraceWriter", "merge_parts", "PARTS_SUFFIX", "MARKER", "PART_GLOB",
           "DEFAULT_FLUSH_SECONDS"]
