"""Traces of guest MSR accesses as data: record (tracefs kvm:kvm_msr), import (trace-cmd
report text), store (chunked, dictionary-encoded .kvmtrace files) and replay against a policy.

    trace = record_tracefs(duration=10, pid=qemu_pid)            # or record_tracefs_to(path, ...)
    trace.save("vm.kvmtrace")
    report = replay(TraceReader("vm.kvmtrace"), filter_decider(flt))
    print(report.table(limit=30)); report.to_json()
"""
from .policy import policy_decider
from .replay import ReplayReport, ReplayRow, filter_decider, naive_counts, replay, report_counts
from .store import (DEFAULT_CHUNK_EVENTS, Chunk, Trace, TraceFormatError, TraceReader, TraceWriter,
                    open_trace)
from .textimport import ImportStats, import_trace_cmd, import_trace_cmd_to, parse_line
from .tracefs import (Recording, TracefsError, TracefsSession, record_tracefs, record_tracefs_to,
                      sweep_stale_instances, tracefs_root)


def bench_replay(n: int = 10_000_000, **kw) -> dict:
    """See kvmgate.trace.bench.bench_replay."""
    from .bench import bench_replay as run
    return run(n, **kw)


__all__ = ["Chunk", "Trace", "TraceWriter", "TraceReader", "TraceFormatError", "open_trace",
           "DEFAULT_CHUNK_EVENTS", "import_trace_cmd", "import_trace_cmd_to", "parse_line",
           "ImportStats", "record_tracefs", "record_tracefs_to", "Recording", "TracefsSession",
           "TracefsError", "tracefs_root", "sweep_stale_instances", "replay", "filter_decider",
           "ReplayReport", "ReplayRow", "naive_counts", "policy_decider", "report_counts", "bench_replay"]
