"""Traces of guest MSR accesses as data: record (tracefs kvm:kvm_msr), import (trace-cmd report
text), store (Apache Parquet with checksums and key summaries, kvmgate.trace.schema) and replay
against a policy, over one file or a fleet's (kvmgate.trace.sources, optionally on Dask).

    trace = record_tracefs(duration=10, pid=qemu_pid)      # or record_tracefs_to(path, ...)
    trace.save("vm.parquet")
    report = replay(["vm.parquet", "fleet/"], filter_decider(flt), by_host=True)
    print(report.table(limit=30)); report.to_json()

A policy file against traces: kvmgate.trace.dryrun.replay_policy.
"""
from .policy import policy_decider
from .replay import (ReplayReport, ReplayRow, filter_decider, naive_counts, replay, report_counts,
                     report_from_summary)
from .schema import COLUMNS, SCHEMA
from .sources import Collected, FileInfo, collect, expand, load_trace, parse_dask
from .memory import Trace, concat
from .reading import TraceFile
from .writing import TraceWriter
from .summary import Summary, TraceFormatError
from .textimport import ImportStats, import_trace_cmd, import_trace_cmd_to, parse_line
from .tracefs import (Recording, TracefsError, TracefsSession, record_tracefs, record_tracefs_to,
                      sweep_stale_instances, tracefs_root)

__all__ = ["Trace", "TraceWriter", "TraceFile", "TraceFormatError", "Summary", "SCHEMA", "COLUMNS",
           "concat", "load_trace", "collect", "expand", "parse_dask", "Collected", "FileInfo",
           "import_trace_cmd", "import_trace_cmd_to", "parse_line", "ImportStats",
           "record_tracefs", "record_tracefs_to", "Recording", "TracefsSession", "TracefsError",
           "tracefs_root", "sweep_stale_instances", "replay", "report_from_summary",
           "filter_decider", "ReplayReport", "ReplayRow", "naive_counts", "policy_decider",
           "report_counts"]
