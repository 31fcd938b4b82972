"""`kvmgate run GUEST`: a guest under a policy, with audit, metrics and introspection."""
from __future__ import annotations

import sys

from .common import port_number, positive_seconds, vcpu_count, writable_file
from .introspect import add_run_arguments

# Exit codes of `kvmgate run`: 0 the guest halted; 1 a failure (guest error, timeout, KVM,
# an audit write failed under audit_failure = "stop"); 2 a user mistake; 128 + N when signal N
# (SIGINT: 130, SIGTERM: 143) ended the run: both end it the same clean way, with the audit's
# suppressed counts written and the summary printed.
SIGNAL_EXIT = 128
METRICS_EVERY = 5.0          # seconds between textfile writes (--metrics-file)


def cmd_run(a) -> int:
    from ..audit import AuditFailure, AuditLog
    from ..exits import Stopped
    from ..guest import load_guest
    from ..policy import load_policy
    from ..supervise import Supervisor
    from ..vm import Machine
    from .introspect import serve_introspection
    guest = load_guest(a.guest)
    policy = load_policy(a.policy) if a.policy else None
    mode = a.mode or (policy.mode if policy else "enforce")
    on_failure = a.audit_failure or (policy.audit_failure if policy else "stop")
    audit = AuditLog(a.audit, rate=policy.audit_rate if policy else 20.0,
                     burst=policy.audit_burst if policy else 20, on_failure=on_failure) \
        if a.audit or policy else None
    bind = _binder(mode)
    failure = None
    stop_signal = None
    metrics = None
    with Machine(guest, vcpus=a.vcpus, keep_exits=False) as m:
        intro = None
        try:
            intro = serve_introspection(m, a)          # None without --introspect
            if policy is not None:
                m.set_policy(bind(policy), audit)
            metrics = _metrics(a, m, audit)
            with Supervisor(m, policy_path=a.policy, load=lambda p: bind(load_policy(p)), audit=audit,
                            reload_counter=metrics.reloads if metrics else None) as sup:
                try:
                    if metrics is not None and a.metrics_file:
                        metrics.write_every(a.metrics_file, METRICS_EVERY)
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
            if metrics is not None:
                metrics.close(a.metrics_file)  # the final counts, written last
        r = m.last_result
    _report(a, r, audit, stop_signal)
    if failure is not None:
        print(f"kvmgate: {failure.strerror}", file=sys.stderr)
        return 1
    return SIGNAL_EXIT + stop_signal if stop_signal else 0


def _binder(mode: str):
    """How a loaded policy is installed: through the C engine when it is built (the vCPUs then
    run the C run loop: exits the policy answers never enter Python), else as itself (the
    Python handlers).  Permissive (audit) mode needs the engine, which implements it."""
    from ..engine import EnginePolicy, available, unavailable_reason
    from ..errors import UserError
    from ..hostinfo import ignore_msrs
    from ..policy import compile_policy
    if not available():
        if mode == "enforce":
            return lambda policy: policy
        raise UserError(f"permissive mode needs the C policy engine: {unavailable_reason()}", "--mode")
    return lambda policy: EnginePolicy(compile_policy(policy, ignore_msrs()), mode)


def _metrics(a, m, audit):
    """Prometheus metrics on --metrics-port / --metrics-file, or None."""
    if a.metrics_port is None and not a.metrics_file:
        return None
    from ..metrics import Metrics
    # decisions, audit and reload counters and the vCPUs' live exit counts (read at scrape)
    metrics = Metrics(audit=audit, exits=m.exit_counts)
    if a.metrics_port is not None:
        port = metrics.serve(a.metrics_port, a.metrics_addr)
        print(f"kvmgate: metrics on http://{a.metrics_addr}:{port}/metrics", file=sys.stderr, flush=True)
    return metrics


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
    p = sub.add_parser("run", help="run a guest (assembly .S or flat binary) under a policy")
    p.add_argument("guest")
    p.add_argument("--policy", help="TOML policy file (SIGHUP reloads it while the guest runs)")
    p.add_argument("--audit", type=writable_file("audit log"),
                   help="append JSON Lines audit records to this file (SIGUSR1 reopens it)")
    p.add_argument("--audit-failure", choices=("stop", "warn"),
                   help="a failed audit write stops the guest (default) or warns; overrides the policy")
    p.add_argument("--mode", choices=("enforce", "audit"),
                   help="audit: permissive, log what the policy would deny and let it happen "
                        "(overrides the policy's [policy] mode)")
    p.add_argument("--timeout", type=positive_seconds, default=60.0,
                   help="seconds (finite, > 0) before the run is stopped")
    p.add_argument("--vcpus", type=vcpu_count, default=1, help="1 to 64")
    p.add_argument("--metrics-port", type=port_number,
                   help="serve Prometheus metrics on this port (0: any free port)")
    p.add_argument("--metrics-addr", default="127.0.0.1", help="address for --metrics-port")
    p.add_argument("--metrics-file", type=writable_file("metrics file"),
                   help="write Prometheus metrics to this file (node_exporter textfile) every "
                        f"{METRICS_EVERY:g} s and at the end")
    p.add_argument("--json", action="store_true")
    add_run_arguments(p)
    p.set_defaults(fn=cmd_run)
