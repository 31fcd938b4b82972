"""The trace file format: Apache Parquet with one row per kvm:kvm_msr event.

Columns (the Arrow schema below; DuckDB, pandas, Polars and Spark read the files as they are):

    index      uint32                     the MSR (ECX of the guest's RDMSR/WRMSR)
    direction  dictionary<int8, string>   "read" or "write"
    value      uint64                     the value read or written (EDX:EAX)
    exception  bool                       KVM injected #GP for it (the tracepoint's " (#GP)")
    pid        int32                      the thread that made the access (tracepoint common_pid:
                                          a vCPU thread id)
    vcpu       int16, nullable            the vCPU index where known (QEMU's "CPU n/KVM" threads)
    time_ns    int64                      nanoseconds on the trace's clock (metadata "clock")
    host       dictionary<int32, string>  the host the events were recorded on

Written dictionary-encoded (index, direction, pid, vcpu, host), zstd-compressed, with Parquet
page checksums (CRC32 of every page) and data pages of format 1.0.

Each row group is at most ROW_GROUP_EVENTS events.  The file's key-value metadata carries, under
META_KEY, a JSON document: format and version, the event and row-group counts, the trace's
metadata (source, clock, kernel, ...), and per row group its *key summary*: every distinct
(host, index, direction, exception) with its event count, first and last time, the threads seen
and up to SUMMARY_VALUES distinct values (kvmgate.trace.summary), plus a CRC32 of the whole
document.  Replay counts from the summaries after checking the checksums of the pages of the
key columns; a file written by another tool has no summary and is read event by event.
"""
from __future__ import annotations

import json
import zlib

import pyarrow as pa

FORMAT = "kvmgate-trace"
VERSION = 1
META_KEY = b"kvmgate.trace"
ROW_GROUP_EVENTS = 1 << 20
KEY_COLUMNS = ("index", "direction", "exception")     # what replay's verdict depends on
DIRECTIONS = ("read", "write")

SCHEMA = pa.schema([
    pa.field("index", pa.uint32(), nullable=False),
    pa.field("direction", pa.dictionary(pa.int8(), pa.string()), nullable=False),
    pa.field("value", pa.uint64(), nullable=False),
    pa.field("exception", pa.bool_(), nullable=False),
    pa.field("pid", pa.int32(), nullable=False),
    pa.field("vcpu", pa.int16(), nullable=True),
    pa.field("time_ns", pa.int64(), nullable=False),
    pa.field("host", pa.dictionary(pa.int32(), pa.string()), nullable=False),
])
COLUMNS = tuple(SCHEMA.names)

WRITE_OPTIONS = dict(compression="zstd", use_dictionary=["index", "direction", "pid", "vcpu", "host"],
                     write_page_checksum=True, data_page_version="1.0", write_statistics=True,
                     data_page_size=16 << 20, max_rows_per_page=1 << 20)   # few pages: cheap to check



def document_crc(doc: dict) -> int:
    """The CRC32 of the kvmgate document without its "crc" key (canonical JSON)."""
    body = {k: v for k, v in doc.items() if k != "crc"}
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


__all__ = ["SCHEMA", "COLUMNS", "KEY_COLUMNS", "DIRECTIONS", "FORMAT", "VERSION", "META_KEY",
           "ROW_GROUP_EVENTS", "WRITE_OPTIONS", "document_crc"]
