"""Traces in memory and in Parquet files, in one import (the modules below hold the code):

columns      events as numpy columns and Arrow tables of schema.SCHEMA
memory       Trace (events in memory), concat
parquet_out  ParquetOut: one trace file being written (row groups, footer document)
writing      TraceWriter (streaming, crash-safe parts), merge_parts
reading      TraceFile: one trace file opened and checked (footer, document, page checksums)
"""
from .columns import columns, default_host, from_table, to_table, vcpu_of_comm
from .memory import Trace, concat
from .reading import TraceFile
from .schema import COLUMNS
from .summary import TraceFormatError
from .writing import DEFAULT_FLUSH_SECONDS, MARKER, PART_GLOB, PARTS_SUFFIX, TraceWriter, merge_parts

__all__ = ["Trace", "TraceWriter", "TraceFile", "TraceFormatError", "columns", "concat",
           "to_table", "from_table", "vcpu_of_comm", "default_host", "merge_parts",
           "PARTS_SUFFIX", "MARKER", "PART_GLOB", "DEFAULT_FLUSH_SECONDS", "COLUMNS"]
