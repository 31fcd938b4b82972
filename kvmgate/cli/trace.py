"""`kvmgate trace record|import|replay`."""
from __future__ import annotations

import os
import sys
import threading

from ..errors import UserError
from .common import Progress, StopOnSignals, in_path, nonneg_seconds, out_path, positive_int


# ---- trace record

_STOPPED = {"stop": "stopped by a signal", "duration": "duration reached", "interrupt": "interrupted"}

def cmd_trace_record(a) -> int:
    from ..trace import record_tracefs_to
    out = out_path(a.out, "trace file")
    if a.pid is not None and a.pid <= 0:
        raise UserError(f"{a.pid}: not a process id", "--pid")
    stop = threading.Event()
    who = f"pid {a.pid} (all its threads)" if a.pid is not None else "every VM on the host"
    limit = f" for {a.duration:g} s" if a.duration is not None else ""
    progress = Progress(f"recording kvm:kvm_msr of {who}{limit} to {out}")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with StopOnSignals(stop):
            reader = record_tracefs_to(tmp, duration=a.duration, pid=a.pid, stop=stop,
                                       progress=progress, buffer_kb=a.buffer_kb)
        os.replace(tmp, out)
    finally:
        progress.done()
        if tmp.exists():
            tmp.unlink()
    with reader:
        meta = reader.meta
        n = len(reader)
    lost = meta.get("lost_events", 0)
    why = _STOPPED.get(meta.get("stopped_by"), meta.get("stopped_by"))
    print(f"kvmgate: recorded {n} events in {meta.get('duration_s', 0):.1f} s ({why}), "
          f"{lost} lost, to {out}", file=sys.stderr)
    if lost:
        print("kvmgate: warning: the kernel dropped events: record with --buffer-kb larger",
              file=sys.stderr)
    return 0


# ---- trace import

def cmd_trace_import(a) -> int:
    from ..report import emit
    from ..trace import import_trace_cmd_to
    src = in_path(a.report, "report")
    out = out_path(a.out, "trace file")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        reader = import_trace_cmd_to(src, tmp)
        with reader:
            stats = reader.meta.get("import", {})
            n = len(reader)
        if n == 0 and not stats.get("skipped_events") and not stats.get("malformed"):
            raise UserError(f"no trace events in {stats.get('lines', 0)} lines: expected the text "
                            "of `trace-cmd report` (or ftrace's trace / trace_pipe)", str(src))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    if a.json:
        emit({"out": str(out), "events": n, **stats}, True)
        return 0
    skipped = sum(stats.get("skipped_events", {}).values())
    print(f"imported {n} kvm_msr events from {stats.get('lines', 0)} lines to {out} "
          f"({skipped} other events skipped, {stats.get('malformed', 0)} malformed kvm_msr lines)")
    for ex in stats.get("malformed_examples", []):
        print(f"  malformed: {ex}")
    return 0


# ---- trace replay

def _classifier(reader):
    """kernel(index, write) for the trace's #GP events, asked of this host's KVM (MsrProber)."""
    import numpy as np
    from ..probe import Access, MsrProber
    from ..msr.model import READ, WRITE
    first: dict[tuple[int, bool], int] = {}
    for chunk in reader.iter_chunks():
        exc = chunk.key_exception.view(bool)
        if not exc.any():
            continue
        codes = np.flatnonzero(exc)
        for code in codes.tolist():
            key = (int(chunk.key_index[code]), bool(chunk.key_write[code]))
            if key not in first:
                pos = int(np.argmax(chunk.codes == code))
                first[key] = int(chunk.value[pos])
    kinds = {}
    if first:
        keys = list(first)
        with MsrProber() as p:
            got = p.classify([Access(i, WRITE if w else READ, first[(i, w)]) for i, w in keys])
        kinds = dict(zip(keys, got))
    return lambda index, write: kinds.get((index, bool(write)))


def replay_policy(policy_path, trace_path, *, classify: bool = False):
    """(ReplayReport, CompiledPolicy) for a policy file and a trace file."""
    from ..hostinfo import ignore_msrs
    from ..policy import compile_policy, load_policy
    from ..trace import TraceReader, policy_decider, replay
    cp = compile_policy(load_policy(policy_path), ignore_msrs())
    in_path(trace_path, "trace")
    with TraceReader(trace_path) as reader:
        kernel = _classifier(reader) if classify else None
        return replay(reader, policy_decider(cp, kernel)), cp


def _rows_with(report, verdict: str) -> list[dict]:
    """Rows (MSR, direction) with events of `verdict` (also "a|b" verdicts naming it), most first."""
    rows = []
    for r in report.rows:
        n = sum(c for v, c in r.verdicts.items() if verdict in v.split("|"))
        if n:
            rows.append({"msr": f"{r.index:#x}", "name": r.name or "", "access": r.direction,
                         "count": n, "events": r.events,
                         "first_s": round(r.first_ns / 1e9, 6), "last_s": round(r.last_ns / 1e9, 6),
                         "pids": ",".join(map(str, r.pids[:4])) + (",..." if len(r.pids) > 4 else ""),
                         "_key": (-n, r.index, r.write)})
    rows.sort(key=lambda d: d["_key"])
    for d in rows:
        del d["_key"]
    return rows


def cmd_trace_replay(a) -> int:
    import json
    from ..report import table
    rep, cp = replay_policy(a.policy, a.trace, classify=a.classify)
    denied = _rows_with(rep, "deny")
    kernel_gp = _rows_with(rep, "gp-kernel")
    ndenied = sum(r["count"] for r in denied)
    if a.json:
        d = rep.to_dict()
        d.update(policy=str(a.policy), trace=str(a.trace), denied=denied, kernel_gp=kernel_gp,
                 denied_events=ndenied)
        print(json.dumps(d, indent=2, default=str))
    else:
        print(f"policy {cp.policy.name!r} ({a.policy}) over {a.trace}: {rep.events} events, "
              f"{len(rep.rows)} MSR/direction pairs")
        for v, n in sorted(rep.totals.items(), key=lambda kv: -kv[1]):
            print(f"  {v:<16} {n:>12} ({100 * n / (rep.events or 1):.2f}%)")
        print(f"\nwould be denied by the policy: {ndenied} events, {len(denied)} MSR/direction pairs")
        if denied:
            table(denied[:a.limit] if a.limit else denied)
            if a.limit and len(denied) > a.limit:
                print(f"... {len(denied) - a.limit} more (--limit 0 shows all)")
        if kernel_gp:
            print(f"\nfailed by KVM itself when recorded (#GP under any policy): "
                  f"{sum(r['count'] for r in kernel_gp)} events")
            table(kernel_gp[:a.limit] if a.limit else kernel_gp)
        if a.all:
            print()
            print(rep.table(limit=a.limit or None))
    return 1 if a.fail_on_deny and ndenied else 0


def register(sub) -> None:
    """`trace record|import|replay` under an argparse subparsers object."""
    tr = sub.add_parser("trace", help="record, import and replay kvm:kvm_msr traces")
    tsub = tr.add_subparsers(dest="tcmd", required=True, metavar="ACTION")
    p = tsub.add_parser("record", help="record kvm:kvm_msr events through tracefs (Ctrl-C ends it)")
    p.add_argument("--pid", type=int, help="only this process (all its threads, also later ones)")
    p.add_argument("--duration", type=nonneg_seconds, help="seconds (default: until Ctrl-C)")
    p.add_argument("--buffer-kb", type=positive_int, help="ring buffer per CPU, KiB")
    p.add_argument("--out", required=True, help=".kvmtrace file to write")
    p.set_defaults(fn=cmd_trace_record)
    p = tsub.add_parser("import", help="convert `trace-cmd report` text into a .kvmtrace file")
    p.add_argument("report")
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_trace_import)
    p = tsub.add_parser("replay", help="what a policy would have done with a recorded trace")
    p.add_argument("trace")
    p.add_argument("--policy", required=True, help="TOML policy file")
    p.add_argument("--classify", action="store_true",
                   help="ask this host's KVM whether each #GP event was an unknown MSR or an invalid access")
    p.add_argument("--limit", type=int, default=30, help="rows per table (0: all)")
    p.add_argument("--all", action="store_true", help="also every MSR/direction with all verdicts")
    p.add_argument("--fail-on-deny", action="store_true", help="exit 1 if anything would be denied")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_trace_replay)
