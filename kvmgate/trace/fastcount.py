"""Counting a kvmgate trace file's keys from its data, fast: what `--full-check` does with a
file that carries kvmgate's document (kvmgate.trace.schema).

Every page of every column is checked against its CRC32 without decoding (pagecheck), then only
the key columns (index, direction, exception, host) are decoded, one row group at a time on one
thread, and counted without per-event Python objects: the MSR indices are mapped to the row
group's distinct MSRs (taken from its stored key summary; an MSR the summary lacks is damage) by
Arrow's hash lookup, combined with the host, direction and exception codes into one small
integer per event, and counted with numpy.bincount.  The distinct keys and their counts must
equal the stored summary's exactly, else the file is refused (TraceFormatError).  What replay
then merges is the stored summaries, so times, threads and values are the writer's (covered by
the document's CRC32).  docs: README "Trace files".
"""
from __future__ import annotations

import mmap

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .pagecheck import PageError, check_row_group_column
from .schema import DIRECTIONS, SCHEMA
from .summary import Summary, TraceFormatError, pack_keys

COUNTED = ("index", "direction", "exception", "host")


def applies(tf) -> bool:
    """A kvmgate file whose counted columns have the types kvmgate writes."""
    schema = tf.pf.schema_arrow
    return tf.doc is not None and all(
        c in schema.names and schema.field(c).type == SCHEMA.field(c).type for c in COUNTED)


def check_all_pages(tf) -> None:
    """The CRC32 of every page of every column of every row group, and the value counts."""
    names = tf.pf.schema_arrow.names
    g = c = 0
    try:
        with open(tf.path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for g in range(tf.row_groups):
                rg = tf.md.row_group(g)
                for c in range(rg.num_columns):
                    check_row_group_column(mm, rg, c)
    except PageError as e:
        raise TraceFormatError(f"damaged: row group {g}, column {names[c]!r}: {e}", tf.where) from None
    except (OSError, ValueError) as e:
        raise TraceFormatError(f"cannot check pages: {str(e)[:200]}", tf.where) from None


def _dictionary(col: pa.ChunkedArray) -> tuple[np.ndarray, list]:
    arr = col.combine_chunks()
    if arr.null_count:
        raise ValueError("nulls")
    return arr.indices.to_numpy(zero_copy_only=False), arr.dictionary.to_pylist()


def _bits(col: pa.ChunkedArray) -> np.ndarray:
    arr = col.combine_chunks()
    if arr.null_count:
        raise ValueError("nulls")
    raw = np.frombuffer(arr.buffers()[1], np.uint8)
    return np.unpackbits(raw, bitorder="little")[arr.offset:arr.offset + len(arr)]


def group_keys(tf, g: int, stored: Summary) -> tuple[np.ndarray, np.ndarray]:
    """(sorted keys as pack_keys with the stored summary's host codes, counts) of row group g,
    from its decoded key columns."""
    where = f"{tf.where}: row group {g}"
    try:
        t = tf.pf.read_row_group(g, columns=list(COUNTED), use_threads=False)
        t.validate(full=True)               # page headers are not under the CRCs: check Arrow's invariants
        if t.num_rows != tf.md.row_group(g).num_rows:
            raise ValueError(f"{t.num_rows} rows decoded")
        index = t.column("index").combine_chunks()
        d_codes, d_names = _dictionary(t.column("direction"))
        h_codes, h_names = _dictionary(t.column("host"))
        exc = _bits(t.column("exception"))
    except (pa.ArrowException, OSError, ValueError, IndexError) as e:
        raise TraceFormatError(f"damaged: {str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}",
                               where) from None
    if index.null_count or any(n not in DIRECTIONS for n in d_names):
        raise TraceFormatError("damaged: nulls or unknown directions in the key columns", where)
    _, s_index, _, _ = stored.columns()
    msrs = np.unique(s_index)
    code = pc.index_in(index, value_set=pa.array(msrs, pa.uint32()))
    if code.null_count:
        raise TraceFormatError("damaged: the events disagree with the stored key summary", where)
    nh = max(len(h_names), 1)
    if len(msrs) * nh * 4 >= 1 << 31:
        raise TraceFormatError("too many distinct keys in one row group", where)
    # one int32 per event: ((msr code * hosts + host) * 2 + write) * 2 + exception, in place
    combined = code.to_numpy(zero_copy_only=False).astype(np.int32, copy=False) * np.int32(4 * nh)
    if nh > 1:
        combined += h_codes.astype(np.int32, copy=False) * np.int32(4)
    write = d_codes if d_names == list(DIRECTIONS) else \
        np.array([n == "write" for n in d_names], np.int8)[d_codes]
    combined += write
    combined += write
    combined += exc
    counts = np.bincount(combined, minlength=len(msrs) * nh * 4)
    hit = np.flatnonzero(counts)
    host_of = np.array([stored.hosts.index(h) if h in stored.hosts else -1 for h in h_names] or [-1], np.int64)
    host = host_of[(hit >> 2) % nh]
    if (host < 0).any():
        raise TraceFormatError("damaged: the events disagree with the stored key summary", where)
    keys = pack_keys(host, msrs[hit // (4 * nh)], (hit >> 1) & 1, hit & 1)
    order = np.argsort(keys)
    return keys[order], counts[hit][order].astype(np.int64)


def verified_summary(tf) -> Summary:
    """The merged stored summaries of a kvmgate file (applies(tf)), after every page's CRC and
    every row group's key counts, counted from its data, agree with them."""
    stored = tf.stored_summaries()
    check_all_pages(tf)
    for g, s in enumerate(stored):
        keys, counts = group_keys(tf, g, s)
        if not (np.array_equal(keys, s.keys) and np.array_equal(counts, s.count)):
            raise TraceFormatError("damaged: the events disagree with the stored key summary",
                                   f"{tf.where}: row group {g}")
    return Summary.merge(stored)


__all__ = ["verified_summary", "applies", "check_all_pages", "group_keys"]
