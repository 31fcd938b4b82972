"""`kvmgate run GUEST`: a guest under a policy, with audit and introspection."""
from __future__ import annotations

import sys

# Exit codes of `kvmgate run`: 0 the guest halted; 1 a failure (guest error, timeout, KVM,
# an audit write failed under audit_failure = "stop"); 2 a user mistake; 128 + N when signal N
# (SIGINT: 130, SIGTERM: 143) ended the run: both end it the same clean way, with the audit's
# suppressed counts written and the summary printed.
SIGNAL_EXIT = 128


def cmd_run(a) -> int:
    from ..audit import AuditFailure, AuditLog
    from ..exits import Stopped
    from ..vm import Machine
    from ..policy import load_policy
    from ..guest import load_guest
    from ..supervise import Supervisor
    guest = load_guest(a.guest)
    policy = load_policy(a.policy) if a.policy else None
    audit = AuditLog(a.audit, rate=policy.audit_rate if policy else 20.0,
                     burst=policy.audit_burst if policy else 20,
                     on_failure=policy.audit_failure if policy else "stop") \
        if a.audit or policy else None
    failure = None
    stop_signal = None
    with Machine(guest, vcpus=a.vcpus, keep_exits=False) as m:
        intro = None
        try:
            if a.introspect:
                from .introspect import serve_introspection
                intro = serve_introspection(m, a.introspect, a.allow_commands, a.allow_events)
            if policy is not None:
                m.set_policy(policy, audit)
            with Supervisor(m, policy_path=a.policy, load=load_policy, audit=audit) as sup:
                try:
                    m.run(timeout=a.timeout)
                except Stopped:
                    if sup.stop_signal is None:
                        raise
                    stop_signal = sup.stop_signal
                except AuditFailure as e:
                    failure = e
        finally:
            if intro is not None:
                intro.close()
            if audit is not None:
                try:
                    audit.close()              # the suppressed counts still owed
                except AuditFailure as e:
                    failure = failure or e
        r = m.last_result
    _report(a, r, audit, stop_signal)
    if failure is not None:
        print(f"kvmgate: {failure.strerror}", file=sys.stderr)
        return 1
    return SIGNAL_EXIT + stop_signal if stop_signal else 0


def _report(a, r, audit, stop_signal) -> None:
    """The run summary: exits, faults, registers, per-MSR decision counters."""
    from ..report import emit, table
    summary = audit.summary() if audit else []
    how = "halted" if not stop_signal else f"stopped by signal {stop_signal}"
    result = {"halted": not stop_signal, "seconds": round(r.seconds, 6),
              "msr_exits": r.msr_exit_count, "gp_faults": r.gp_fault_count,
              "regs": {v.vcpu: {k: f"{getattr(v.regs, k):#x}" for k in ("rax", "rbx", "rcx", "rdx", "rip")}
                       for v in r.vcpus if v.regs is not None},
              "decisions": summary}
    if stop_signal:
        result["signal"] = stop_signal
    if a.json:
        emit(result, True)
        return
    print(f"guest {how} after {r.seconds:.3f} s: {r.msr_exit_count} MSR exits, "
          f"{r.gp_fault_count} #GP")
    if summary:
        print()
        table(summary)


def register(sub) -> None:
    from .introspect import add_run_arguments
    p = sub.add_parser("run", help="run a guest (assembly .S or flat binary) under a policy")
    p.add_argument("guest")
    p.add_argument("--policy", help="TOML policy file (SIGHUP reloads it while the guest runs)")
    p.add_argument("--audit", help="append JSON Lines audit records to this file")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--json", action="store_true")
    add_run_arguments(p)
    p.set_defaults(fn=cmd_run)
