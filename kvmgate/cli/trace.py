"""`kvmgate trace record|import|replay`: parse, call kvmgate.trace, print."""
from __future__ import annotations

import json
import sys
import threading

from ..argtypes import nonneg_int, positive_int
from ..errors import UserError
from ..report import emit, table
from ..trace import import_trace_cmd_to, parse_dask, record_tracefs_to
from ..trace.dryrun import replay_policy
from ..trace.writing import DEFAULT_FLUSH_SECONDS
from .common import Progress, StopOnSignals, in_path, nonneg_seconds, out_path, positive_seconds

EXIT_PARTIAL = 3          # a partial trace (an unfinished recording) without --accept-partial

_STOPPED = {"stop": "stopped by a signal", "duration": "duration reached", "interrupt": "interrupted"}


# ---- trace record

def cmd_trace_record(a) -> int:
    out = out_path(a.out, "trace file")
    if a.pid is not None and a.pid <= 0:
        raise UserError(f"{a.pid}: not a process id", "--pid")
    parts = out.with_name(out.name + ".parts")
    if parts.exists():
        raise UserError(f"{parts} exists: an unfinished recording (replay it with --accept-partial, "
                        "or remove it)", str(out))
    stop = threading.Event()
    who = f"pid {a.pid} (all its threads)" if a.pid is not None else "every VM on the host"
    limit = f" for {a.duration:g} s" if a.duration is not None else ""
    progress = Progress(f"recording kvm:kvm_msr of {who}{limit} to {out} "
                        f"(flushed to {parts.name}/ every {a.flush_seconds:g} s)")
    try:
        with StopOnSignals(stop):
            f = record_tracefs_to(out, duration=a.duration, pid=a.pid, stop=stop, progress=progress,
                                  buffer_kb=a.buffer_kb, flush_seconds=a.flush_seconds)
    finally:
        progress.done()
    meta = f.meta
    lost = meta.get("lost_events", 0)
    why = _STOPPED.get(meta.get("stopped_by"), meta.get("stopped_by"))
    print(f"kvmgate: recorded {f.events} events in {meta.get('duration_s', 0):.1f} s ({why}), "
          f"{lost} lost, to {out}", file=sys.stderr)
    if lost:
        print("kvmgate: warning: the kernel dropped events: record with --buffer-kb larger",
              file=sys.stderr)
    return 0


# ---- trace import

def cmd_trace_import(a) -> int:
    src = in_path(a.report, "report")
    out = out_path(a.out, "trace file")
    f = import_trace_cmd_to(src, out, host=a.host)
    stats = f.meta.get("import", {})
    if f.events == 0 and not stats.get("skipped_events") and not stats.get("malformed"):
        out.unlink(missing_ok=True)
        raise UserError(f"no trace events in {stats.get('lines', 0)} lines: expected the text "
                        "of `trace-cmd report` (or ftrace's trace / trace_pipe)", str(src))
    if a.json:
        emit({"out": str(out), "events": f.events, **stats}, True)
        return 0
    skipped = sum(stats.get("skipped_events", {}).values())
    print(f"imported {f.events} kvm_msr events from {stats.get('lines', 0)} lines to {out} "
          f"({skipped} other events skipped, {stats.get('malformed', 0)} malformed kvm_msr lines)")
    for ex in stats.get("malformed_examples", []):
        print(f"  malformed: {ex}")
    return 0


# ---- trace replay

def _rows_with(report, verdict: str) -> list[dict]:
    """Rows (MSR, direction[, host]) with events of `verdict` (also "a|b" verdicts naming it)."""
    rows = []
    for r in report.rows:
        n = sum(c for v, c in r.verdicts.items() if verdict in v.split("|"))
        if n:
            d = {"host": r.host} if r.host is not None else {}
            d |= {"msr": f"{r.index:#x}", "name": r.name or "", "access": r.direction,
                  "count": n, "events": r.events,
                  "first_s": round(r.first_ns / 1e9, 6), "last_s": round(r.last_ns / 1e9, 6),
                  "pids": ",".join(map(str, r.pids[:4])) + (",..." if len(r.pids) > 4 else ""),
                  "_key": (r.host or "", -n, r.index, r.write)}
            rows.append(d)
    rows.sort(key=lambda d: d["_key"])
    for d in rows:
        del d["_key"]
    return rows


def _limited(rows, limit):
    table(rows[:limit] if limit else rows)
    if limit and len(rows) > limit:
        print(f"... {len(rows) - limit} more (--limit 0 shows all)")


def cmd_trace_replay(a) -> int:
    dask = parse_dask(a.dask)
    rep, cp = replay_policy(a.policy, a.trace, classify=a.classify, by_host=a.by_host,
                            full=a.full_check, dask=dask)
    denied = _rows_with(rep, "deny")
    kernel_gp = _rows_with(rep, "gp-kernel")
    ndenied = sum(r["count"] for r in denied)
    what = a.trace[0] if len(a.trace) == 1 else f"{len(a.trace)} paths"
    if a.json:
        d = rep.to_dict()
        d.update(policy=str(a.policy), traces=[str(t) for t in a.trace], denied=denied,
                 kernel_gp=kernel_gp, denied_events=ndenied)
        print(json.dumps(d, indent=2, default=str))
    else:
        hosts = sorted({h for f in rep.files for h in f.hosts})
        print(f"policy {cp.policy.name!r} ({a.policy}) over {what}: {rep.events} events in "
              f"{len(rep.files)} files from {len(hosts)} hosts, {len(rep.rows)} MSR/direction rows")
        for v, n in sorted(rep.totals.items(), key=lambda kv: -kv[1]):
            print(f"  {v:<16} {n:>12} ({100 * n / (rep.events or 1):.2f}%)")
        if rep.by_host is not None:
            print("\nper host:")
            table([{"host": h, "events": sum(t.values()), **t} for h, t in sorted(rep.by_host.items())])
        print(f"\nwould be denied by the policy: {ndenied} events, {len(denied)} MSR/direction "
              f"{'(per host) ' if a.by_host else ''}rows")
        if denied:
            _limited(denied, a.limit)
        if kernel_gp:
            print(f"\nfailed by KVM itself when recorded (#GP under any policy): "
                  f"{sum(r['count'] for r in kernel_gp)} events")
            _limited(kernel_gp, a.limit)
        if a.all:
            print()
            print(rep.table(limit=a.limit or None))
    for p in rep.partial:
        print(f"kvmgate: warning: partial trace: {p}", file=sys.stderr)
    if rep.partial and not a.accept_partial:
        print("kvmgate: the counts above cover only what was recovered; exit "
              f"{EXIT_PARTIAL} (--accept-partial accepts them)", file=sys.stderr)
        return EXIT_PARTIAL
    return 1 if a.fail_on_deny and ndenied else 0


def fleet_arguments(p) -> None:
    """--dask, --full-check, --accept-partial (trace replay and learn --from-trace)."""
    p.add_argument("--dask", metavar="SCHEDULER",
                   help="run the per-file work on a Dask cluster: a scheduler address "
                        "(tcp://HOST:PORT) or local:N (N workers in this process)")
    p.add_argument("--full-check", action="store_true",
                   help="decode every event and check it against the stored key summaries "
                        "(default: check the key columns' page checksums, count from the summaries)")
    p.add_argument("--accept-partial", action="store_true",
                   help=f"accept an unfinished recording's recovered events (else exit {EXIT_PARTIAL})")


def register(sub) -> None:
    """`trace record|import|replay` under an argparse subparsers object."""
    tr = sub.add_parser("trace", help="record, import and replay kvm:kvm_msr traces (Parquet)")
    tsub = tr.add_subparsers(dest="tcmd", required=True, metavar="ACTION")
    p = tsub.add_parser("record", help="record kvm:kvm_msr events through tracefs (Ctrl-C ends it)")
    p.add_argument("--pid", type=int, help="only this process (all its threads, also later ones)")
    p.add_argument("--duration", type=nonneg_seconds, help="seconds (default: until Ctrl-C)")
    p.add_argument("--buffer-kb", type=positive_int, help="ring buffer per CPU, KiB")
    p.add_argument("--flush-seconds", type=positive_seconds, default=DEFAULT_FLUSH_SECONDS,
                   help="write what was recorded to OUT.parts/ at least this often (crash safety)")
    p.add_argument("--out", required=True, help="Parquet trace file to write")
    p.set_defaults(fn=cmd_trace_record)
    p = tsub.add_parser("import", help="convert `trace-cmd report` text into a Parquet trace file")
    p.add_argument("report")
    p.add_argument("--out", required=True)
    p.add_argument("--host", help="the host the report was recorded on (default: the report's file name)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_trace_import)
    p = tsub.add_parser("replay", help="what a policy would have done with recorded traces")
    p.add_argument("trace", nargs="+", help="trace files and directories of them (one per host, say)")
    p.add_argument("--policy", required=True, help="TOML policy file")
    p.add_argument("--by-host", action="store_true", help="rows and totals per host too")
    fleet_arguments(p)
    p.add_argument("--classify", action="store_true",
                   help="ask this host's KVM whether each #GP event was an unknown MSR or an invalid access")
    p.add_argument("--limit", type=nonneg_int, default=30, help="rows per table (0: all)")
    p.add_argument("--all", action="store_true", help="also every MSR/direction with all verdicts")
    p.add_argument("--fail-on-deny", action="store_true", help="exit 1 if anything would be denied")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_trace_replay)


__all__ = ["register", "fleet_arguments", "EXIT_PARTIAL"]
