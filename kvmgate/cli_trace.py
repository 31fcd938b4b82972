"""`kvmgate trace record|import|replay` and `kvmgate learn`.

Wire into kvmgate.cli.build_parser() with `register(sub)` (both) or `register_trace(sub)` and
`register_learn(sub)`.  `main(argv)` runs them stand-alone (`python -m kvmgate.cli_trace ...`)
with the same error handling as kvmgate.cli: user mistakes exit 2 with a message, never a
traceback.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from .cliutil import run_main
from .errors import UserError


# ---- helpers

def _out_path(path: str, what: str = "output") -> Path:
    """An output file we can create: its directory exists and is writable, it is not a directory."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{what} is a directory", path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"cannot write {what}: directory {parent} does not exist", path)
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UserError(f"cannot write {what}: permission denied", path)
    return p


def _in_path(path: str, what: str) -> Path:
    p = Path(path)
    try:
        with open(p, "rb"):
            pass
    except IsADirectoryError:
        raise UserError(f"{what} is a directory", path) from None
    except OSError as e:
        raise UserError(f"cannot read {what}: {e.strerror}", path) from None
    return p


def _nonneg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds >= 0")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
    return v


class _Progress:
    """Progress on stderr: one rewritten line on a terminal, a line every few seconds otherwise."""

    def __init__(self, what: str, stream=None, every: float = 5.0):
        self.what = what
        self.out = stream or sys.stderr
        self.tty = self.out.isatty()
        self.every = every
        self.last = -every
        self.started = False

    def __call__(self, events: int, seconds: float) -> None:
        if not self.started:
            self.started = True
            print(f"kvmgate: {self.what} (Ctrl-C to stop)", file=self.out, flush=True)
        if self.tty:
            print(f"\r  {events} events, {seconds:.1f} s", end="", file=self.out, flush=True)
        elif seconds - self.last >= self.every:
            self.last = seconds
            print(f"  {events} events, {seconds:.1f} s", file=self.out, flush=True)

    def done(self) -> None:
        if self.tty and self.started:
            print(file=self.out)


class _StopOnSignals:
    """SIGINT/SIGTERM set `event` instead of raising, so a recording ends cleanly (main thread)."""

    def __init__(self, event: threading.Event):
        self.event = event
        self.old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, lambda *_: self.event.set())
        return self

    def __exit__(self, *exc):
        for sig, h in self.old.items():
            signal.signal(sig, h)


# ---- trace record

_STOPPED = {"stop": "stopped by a signal", "duration": "duration reached", "interrupt": "interrupted"}

def cmd_trace_record(a) -> int:
    from .trace import record_tracefs_to
    out = _out_path(a.out, "trace file")
    if a.pid is not None and a.pid <= 0:
        raise UserError(f"{a.pid}: not a process id", "--pid")
    stop = threading.Event()
    who = f"pid {a.pid} (all its threads)" if a.pid is not None else "every VM on the host"
    limit = f" for {a.duration:g} s" if a.duration is not None else ""
    progress = _Progress(f"recording kvm:kvm_msr of {who}{limit} to {out}")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with _StopOnSignals(stop):
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
    from .report import emit
    from .trace import import_trace_cmd_to
    src = _in_path(a.report, "report")
    out = _out_path(a.out, "trace file")
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
    from .probe import Access, MsrProber
    from .msr.model import READ, WRITE
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
    from .hostinfo import ignore_msrs
    from .policy import compile_policy, load_policy
    from .trace import TraceReader, policy_decider, replay
    cp = compile_policy(load_policy(policy_path), ignore_msrs())
    _in_path(trace_path, "trace")
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
    from .report import table
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


# ---- learn

def cmd_learn(a) -> int:
    from .exits import GuestError
    from .learn import learn, load_guest, write_policy
    from .report import table
    load_guest(a.guest)                       # unreadable: exit 2 before anything runs
    out = _out_path(a.out, "policy file")
    trace_out = _out_path(a.trace_out, "trace file") if a.trace_out else None
    try:
        res = learn(Path(a.guest), recorder=a.recorder, timeout=a.timeout, vcpus=a.vcpus,
                    verify=not a.no_verify)
    except GuestError as e:
        print(f"kvmgate: guest error: {e}; no policy written", file=sys.stderr)
        return 1
    text = res.policy_text(name=a.name, min_run=a.min_run)
    write_policy(text, out)
    if trace_out is not None:
        res.trace.save(trace_out)
    if a.json:
        import json
        d = res.to_dict()
        d.update(policy_file=str(out), trace_file=str(trace_out) if trace_out else None,
                 rules=text.count("[[rule]]"))
        print(json.dumps(d, indent=2))
        return 0
    state = "halted" if res.halted else "stopped at the timeout"
    print(f"learned from {a.guest} with {res.recorder}: guest {state} after {res.seconds:.3f} s, "
          f"{res.events} MSR accesses, {len(res.accesses)} MSR/direction pairs")
    rows = [{"msr": f"{x.index:#x}", "name": x.name or "", "access": x.direction,
             "events": x.events, "gp": x.failed, "allowed": "yes" if x.allowed else "no",
             "note": x.why_not()} for x in res.accesses]
    shown = rows if a.limit == 0 else rows[:a.limit]
    table(shown)
    if len(shown) < len(rows):
        print(f"... {len(rows) - len(shown)} more (--limit 0 or --json shows all)")
    for n in res.notes:
        print(f"note: {n}")
    print(f"wrote {out}: {text.count('[[rule]]')} rules allowing {len(res.allowed())} "
          f"MSR/direction pairs, default deny"
          + (f"; {len(res.refused())} failed in KVM itself, listed as comments" if res.refused() else ""))
    if trace_out is not None:
        print(f"wrote {trace_out}: {len(res.trace)} events (kvmgate trace replay --policy ... {trace_out})")
    return 0


# ---- registration

def register_trace(sub) -> None:
    """`trace record|import|replay` under an argparse subparsers object."""
    tr = sub.add_parser("trace", help="record, import and replay kvm:kvm_msr traces")
    tsub = tr.add_subparsers(dest="tcmd", required=True, metavar="ACTION")
    p = tsub.add_parser("record", help="record kvm:kvm_msr events through tracefs (Ctrl-C ends it)")
    p.add_argument("--pid", type=int, help="only this process (all its threads, also later ones)")
    p.add_argument("--duration", type=_nonneg, help="seconds (default: until Ctrl-C)")
    p.add_argument("--buffer-kb", type=_positive_int, help="ring buffer per CPU, KiB")
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


def register_learn(sub) -> None:
    """`learn` under an argparse subparsers object."""
    from .learn import MIN_RUN, RECORDERS
    p = sub.add_parser("learn", help="run a guest and write the minimal deny-by-default policy it needs")
    p.add_argument("guest", help="assembly .S or flat binary (.bin)")
    p.add_argument("--out", required=True, help="policy file to write (TOML)")
    p.add_argument("--recorder", choices=RECORDERS, default="auto",
                   help="tracefs (kernel tracepoint), exits (user-space MSR exits), auto (tracefs if usable)")
    p.add_argument("--timeout", type=_nonneg, default=60.0,
                   help="seconds; a guest still running then is stopped and learned from so far")
    p.add_argument("--vcpus", type=_positive_int, default=1)
    p.add_argument("--name", help="policy name (default: learned-GUEST)")
    p.add_argument("--min-run", type=_positive_int, default=MIN_RUN,
                   help="consecutive MSRs that become a range rule")
    p.add_argument("--trace-out", help="also save the recorded accesses as a .kvmtrace file")
    p.add_argument("--no-verify", action="store_true",
                   help="do not re-check accesses carried out from user space as guest accesses")
    p.add_argument("--limit", type=int, default=40, help="rows of the access table (0: all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_learn)


def register(sub) -> None:
    """Both `trace` and `learn`."""
    register_trace(sub)
    register_learn(sub)


# ---- stand-alone

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvmgate", description="kvmgate trace and learn commands.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    return run_main(ap, argv)


if __name__ == "__main__":
    sys.exit(main())
