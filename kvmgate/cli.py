"""The `kvmgate` command line.  User mistakes exit 2 with a message, never a traceback."""
from __future__ import annotations

import argparse
import sys

from .cliutil import parse_msrs, run_main
from .errors import UserError


def cmd_demo(a) -> int:
    from .demo import run_demo, run_policy_demo
    from .report import emit, table
    rows = run_demo()
    policy, audit_rows, summary = run_policy_demo()
    if a.json:
        emit({"probes": rows, "policy": policy, "audit": audit_rows, "summary": summary}, True)
        return 0
    print("1) A guest probes real MSRs on /dev/kvm; LSTAR writes are filtered, every failure\n"
          "   exits to user space, which answers MSR_CORE_THREAD_COUNT and #GPs the rest.\n")
    table(rows)
    print(f"\n2) The bundled policy {policy}\n   on the bundled probe guest: the audit log "
          "(kernel-handled accesses make no record).\n")
    table(audit_rows)
    print("\n   Run-end counters (including unlogged decisions):\n")
    table(summary)
    return 0


def cmd_info(a) -> int:
    from .hostinfo import host_info
    from .report import emit
    info = host_info(a.device)
    if a.json:
        emit(info, True)
        return 0
    print(f"device:                      {info['device']}")
    print(f"KVM API version:             {info['api_version']}")
    for name, v in info["capabilities"].items():
        print(f"{name + ':':<29}{'yes' if v else 'NO'} ({v})")
    im = info["ignore_msrs"]
    print(f"kvm.ignore_msrs:             {'unknown' if im is None else ('Y' if im else 'N')}"
          + ("  (unknown MSRs are swallowed host-wide: no UNKNOWN exits)" if im else ""))
    print(f"MSRs KVM saves/restores:     {info['msrs_saved_by_kvm']}")
    return 0


def _compiled(path: str):
    from .hostinfo import ignore_msrs
    from .policy import compile_policy, load_policy
    return compile_policy(load_policy(path), ignore_msrs())


def cmd_policy_check(a) -> int:
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # printed below from cp.warnings, once
        cp = _compiled(a.file)
    from .policy.report import compile_report
    rep = compile_report(cp)
    if a.json:
        from .report import emit
        emit({"ok": True, **rep}, True)
        return 0
    print(f"{a.file}: OK: policy {rep['policy']!r}, {len(cp.policy.rules)} rules, "
          f"{len(rep['ranges'])}/16 filter ranges, {rep['default']}, "
          f"user-space exits: {', '.join(rep['exit_reasons']) or 'none'}")
    for w in cp.warnings:
        print(f"warning: {w}")
    if cp.filter.flags:
        print("note: x2APIC MSRs 0x800-0x8ff are never filtered by KVM; default deny does not cover them")
    return 0


def cmd_policy_compile(a) -> int:
    from .policy.report import compile_report
    from .report import emit, table
    rep = compile_report(_compiled(a.file))
    if a.json:
        emit(rep, True)
        return 0
    print(f"policy {rep['policy']!r}: {rep['default']}, exit mask {rep['exit_mask']} "
          f"({', '.join(rep['exit_reasons']) or 'none'})\n")
    rows = [dict(r, bitmap=r["bitmap"][:32] + ("..." if len(r["bitmap"]) > 32 else "")) for r in rep["ranges"]]
    table(rows)
    print()
    table(rep["user_space_actions"])
    return 0


def cmd_policy_explain(a) -> int:
    from .policy.report import explain_rows, mentioned_msrs
    from .report import emit
    cp = _compiled(a.file)
    msrs = parse_msrs(a.msrs) if a.msrs else mentioned_msrs(cp)
    emit(explain_rows(cp, msrs), a.json,
         ["msr", "name", "access", "filter", "outcome", "handled_by", "logged", "vmx", "svm"])
    return 0


def cmd_policy_diff(a) -> int:
    from .policy.report import diff_rows, mentioned_msrs
    from .report import emit
    pa, pb = _compiled(a.a), _compiled(a.b)
    msrs = parse_msrs(a.msrs) if a.msrs else sorted(set(mentioned_msrs(pa)) | set(mentioned_msrs(pb)))
    rows = diff_rows(pa, pb, msrs)
    if not rows and not a.json:
        print(f"no difference for {len(msrs)} MSRs")
        return 0
    emit(rows, a.json)
    return 0


def cmd_run(a) -> int:
    import signal
    from .audit import AuditLog
    from .machine import Machine
    from .policy import load_policy
    from .report import emit, table
    from .guest import load_guest
    guest = load_guest(a.guest)
    policy = load_policy(a.policy) if a.policy else None
    audit = AuditLog(a.audit, rate=policy.audit_rate if policy else 20.0,
                     burst=policy.audit_burst if policy else 20) if a.audit or policy else None
    with Machine(guest, vcpus=a.vcpus) as m:
        intro = None
        if a.introspect:
            from .cli_introspect import serve_introspection
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


def cmd_bench(a) -> int:
    from . import bench
    return bench.main(a.rest)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvmgate", description="Per-VM control of guest MSR accesses on Linux KVM.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    p = sub.add_parser("demo", help="run a bundled guest that probes MSRs and show where each access went")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("info", help="the host's KVM facts")
    p.add_argument("--device", default="/dev/kvm")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_info)
    p = sub.add_parser("run", help="run a guest (assembly .S or flat binary) under a policy")
    p.add_argument("guest")
    p.add_argument("--policy", help="TOML policy file (SIGHUP reloads it while the guest runs)")
    p.add_argument("--audit", help="append JSON Lines audit records to this file")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--json", action="store_true")
    from .cli_introspect import add_run_arguments, register as register_introspect
    add_run_arguments(p)
    p.set_defaults(fn=cmd_run)
    pol = sub.add_parser("policy", help="check, compile, explain and diff policies")
    psub = pol.add_subparsers(dest="pcmd", required=True, metavar="ACTION")
    p = psub.add_parser("check", help="parse and compile; exit 2 with file:line on errors")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_policy_check)
    p = psub.add_parser("compile", help="the filter ranges, bitmaps and user-space actions")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_policy_compile)
    p = psub.add_parser("explain", help="where each access goes: filter, handler, VMX/SVM pass-through")
    p.add_argument("file")
    p.add_argument("msrs", nargs="*", metavar="MSR", help="names or indices (default: those the policy lists)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_policy_explain)
    p = psub.add_parser("diff", help="accesses two policies treat differently")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("msrs", nargs="*", metavar="MSR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_policy_diff)
    p = sub.add_parser("bench", help="benchmarks (exits, policy, vcpus)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_bench)
    from .cli_trace import register as register_trace
    register_trace(sub)            # trace record|import|replay, learn
    register_introspect(sub)       # introspect unix:PATH watch-msr ...
    return ap


def main(argv: list[str] | None = None) -> int:
    return run_main(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
