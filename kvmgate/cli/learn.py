"""`kvmgate learn GUEST --out POLICY.toml`."""
from __future__ import annotations

import sys
from pathlib import Path

from .common import nonneg_int, nonneg_seconds, out_path, positive_int, vcpu_count, writable_file


def cmd_learn(a) -> int:
    from ..exits import GuestError
    from ..learn import learn, load_guest, write_policy
    from ..report import table
    load_guest(a.guest)                       # unreadable: exit 2 before anything runs
    out = out_path(a.out, "policy file")
    trace_out = out_path(a.trace_out, "trace file") if a.trace_out else None
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


def register(sub) -> None:
    """`learn` under an argparse subparsers object."""
    from ..learn import MIN_RUN, RECORDERS
    p = sub.add_parser("learn", help="run a guest and write the minimal deny-by-default policy it needs")
    p.add_argument("guest", help="assembly .S or flat binary (.bin)")
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
                   help="also save the recorded accesses as a .kvmtrace file")
    p.add_argument("--no-verify", action="store_true",
                   help="do not re-check accesses carried out from user space as guest accesses")
    p.add_argument("--limit", type=nonneg_int, default=40, help="rows of the access table (0: all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_learn)
