"""Reading traces: TraceFile opens one Parquet trace file and checks it.

Damage is never counted silently.  A file is refused (TraceFormatError, exit 2) when it is not
Parquet, is cut short (the footer is gone: Parquet keeps its row-group index at the end, so a
cut file holds nothing readable), its footer or key summaries do not parse or disagree with the
row groups, or a page of a key column fails its checksum.
"""
from __future__ import annotations

import json
import mmap
import os
import stat
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq

from ..errors import UserError
from . import fastcount
from .columns import from_table
from .memory import Trace, concat
from .pagecheck import PageError, check_footer, check_row_group_column, read_footer
from .schema import FORMAT, KEY_COLUMNS, META_KEY, VERSION, document_crc
from .summary import Summary, TraceFormatError

MAX_META_BYTES = 256 << 20


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
            check_footer(read_footer(self.path))       # what pyarrow would abort the process on
        except PageError as e:
            raise TraceFormatError(f"damaged Parquet footer: {e}", self.where) from None
        except OSError as e:
            raise TraceFormatError(f"cannot read trace: {e.strerror}", self.where) from None
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
        if type(doc.get("crc")) is not int or doc["crc"] != document_crc(doc):
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
                            check_row_group_column(mm, rg, c)
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


__all__ = ["TraceFile", "MAX_META_BYTES"]
