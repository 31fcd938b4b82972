"""`kvmgate learn GUEST --out POLICY.toml` and `kvmgate learn --from-trace T [T ...] --out ...`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..argtypes import nonneg_int, positive_int
from ..errors import UserError
from ..exits import GuestError
from ..learn import MIN_RUN, RECORDERS, learn, learn_from_traces, load_guest, write_policy
from ..report import table
from ..trace import parse_dask
from .common import nonneg_seconds, out_path, vcpu_count, writable_file
from .trace import fleet_arguments


def _run_learn(a):
    """The LearnResult of a guest run (None: the guest failed, reported)."""
    load_guest(a.guest)                       # unreadable: exit 2 before anything runs
    try:
        return learn(Path(a.guest), recorder=a.recorder, timeout=a.timeout, vcpus=a.vcpus,
                     verify=not a.no_verify)
    except GuestError as e:
        print(f"kvmgate: guest error: {e}; no policy written", file=sys.stderr)
        return None


def cmd_learn(a) -> int:
    if (a.guest is None) == (a.from_trace is None):
        raise UserError("give a guest to run, or --from-trace with recorded traces (not both)",
                        "learn")
    if a.from_trace is not None and a.trace_out:
        raise UserError("--trace-out records a guest run; with --from-trace there is none", "learn")
    out = out_path(a.out, "policy file")
    trace_out = out_path(a.trace_out, "trace file") if a.trace_out else None
    if a.from_trace is not None:
        res = learn_from_traces(a.from_trace, full=a.full_check, dask=parse_dask(a.dask),
                                accept_partial=a.accept_partial)
    else:
        res = _run_learn(a)
        if res is None:
            return 1
    text = res.policy_text(name=a.name, min_run=a.min_run)
    write_policy(text, out)
    if trace_out is not None:
        res.trace.save(trace_out)
    if a.json:
        d = res.to_dict()
        d.update(policy_file=str(out), trace_file=str(trace_out) if trace_out else None,
                 rules=text.count("[[rule]]"))
        if res.recorder == "trace":
            d.update(files=res.meta.get("files", []), hosts=res.meta.get("hosts", []))
        print(json.dumps(d, indent=2))
        return 0
    if res.recorder == "trace":
        nfiles = len(res.meta.get("files", []))
        print(f"learned from {nfiles} trace files ({len(res.meta.get('hosts', []))} hosts): "
              f"{res.events} MSR accesses, {len(res.accesses)} MSR/direction pairs")
    else:
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


def register(sub) -> None:
    """`learn` under an argparse subparsers object."""
    p = sub.add_parser("learn", help="write the minimal deny-by-default policy a guest needs "
                                     "(from a run, or from recorded traces)")
    p.add_argument("guest", nargs="?", help="assembly .S or flat binary (.bin) to run and learn from")
    p.add_argument("--from-trace", nargs="+", metavar="TRACE",
                   help="learn from recorded traces instead (files or directories; the union of "
                        "every VM in them)")
    p.add_argument("--out", required=True, type=writable_file("policy file"), help="policy file to write (TOML)")
    p.add_argument("--recorder", choices=RECORDERS, default="auto",
                   help="tracefs (kernel tracepoint), exits (user-space MSR exits), auto (tracefs if usable)")
    p.add_argument("--timeout", type=nonneg_seconds, default=60.0,
                   help="seconds; a guest still running then is stopped and learned from so far")
    p.add_argument("--vcpus", type=vcpu_count, default=1, help="1 to 64")
    p.add_argument("--name", help="policy name (default: learned-GUEST)")
    p.add_argument("--min-run", type=positive_int, default=MIN_RUN,
                   help="consecutive MSRs that become a range rule")
    p.add_argument("--trace-out", type=writable_file("trace file"),
                   help="also save the recorded accesses as a Parquet trace file")
    p.add_argument("--no-verify", action="store_true",
                   help="do not re-check accesses carried out from user space as guest accesses")
    fleet_arguments(p)
    p.add_argument("--limit", type=nonneg_int, default=40, help="rows of the access table (0: all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_learn)
