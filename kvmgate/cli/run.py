"""`kvmgate run GUEST`: a guest under a policy, with audit and introspection."""
from __future__ import annotations

import sys

from ..errors import UserError
from .common import positive_seconds, vcpu_count, writable_file
from .introspect import add_run_arguments


def cmd_run(a) -> int:
    import signal
    from ..audit import AuditLog
    from ..machine import Machine
    from ..policy import load_policy
    from ..report import emit, table
    from ..guest import load_guest
    guest = load_guest(a.guest)
    policy = load_policy(a.policy) if a.policy else None
    audit = AuditLog(a.audit, rate=policy.audit_rate if policy else 20.0,
                     burst=policy.audit_burst if policy else 20) if a.audit or policy else None
    with Machine(guest, vcpus=a.vcpus) as m:
        intro = None
        if a.introspect:
            from .introspect import serve_introspection
            intro = serve_introspection(m, a.introspect, a.allow_commands, a.allow_events)
        if policy is not None:
            m.set_policy(policy, audit)

            def reload(*_):
                try:
                    m.set_policy(load_policy(a.policy), audit)
                    print(f"kvmgate: reloaded {a.policy}", file=sys.stderr)
                except UserError as e:
                    print(f"kvmgate: reload refused, old policy stays: {e}", file=sys.stderr)
            signal.signal(signal.SIGHUP, reload)
        try:
            r = m.run(timeout=a.timeout)
        finally:
            if intro is not None:
                intro.close()
            if audit is not None:
                audit.close()
    summary = audit.summary() if audit else []
    result = {"halted": True, "seconds": round(r.seconds, 6), "msr_exits": len(r.msr_exits),
              "gp_faults": len(r.gp_faults),
              "regs": {v.vcpu: {k: f"{getattr(v.regs, k):#x}" for k in ("rax", "rbx", "rcx", "rdx", "rip")}
                       for v in r.vcpus},
              "decisions": summary}
    if a.json:
        emit(result, True)
        return 0
    print(f"guest halted after {r.seconds:.3f} s: {len(r.msr_exits)} MSR exits, {len(r.gp_faults)} #GP")
    if summary:
        print()
        table(summary)
    return 0


def register(sub) -> None:
    p = sub.add_parser("run", help="run a guest (assembly .S or flat binary) under a policy")
    p.add_argument("guest")
    p.add_argument("--policy", help="TOML policy file (SIGHUP reloads it while the guest runs)")
    p.add_argument("--audit", type=writable_file("audit log"),
                   help="append JSON Lines audit records to this file")
    p.add_argument("--timeout", type=positive_seconds, default=60.0,
                   help="seconds (finite, > 0) before the run is stopped")
    p.add_argument("--vcpus", type=vcpu_count, default=1, help="1 to 64")
    p.add_argument("--json", action="store_true")
    add_run_arguments(p)
    p.set_defaults(fn=cmd_run)
