"""`kvmgate policy check|compile|explain|diff|export`."""
from __future__ import annotations

import sys
import warnings

from ..hostinfo import ignore_msrs
from ..policy import compile_policy, load_policy
from ..policy.export import FORMATS
from ..policy.host import ask_kvm
from ..policy.report import compile_report, diff_rows, explain_rows, mentioned_msrs
from ..report import emit, table
from .common import out_path, parse_msrs


def _compiled(path: str):
    return compile_policy(load_policy(path), ignore_msrs())


def cmd_policy_check(a) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # printed below from cp.warnings, once
        cp = _compiled(a.file)
    rep = compile_report(cp)
    if a.json:
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
    cp = _compiled(a.file)
    msrs = parse_msrs(a.msrs) if a.msrs else mentioned_msrs(cp)
    host = ask_kvm(msrs, a.device)
    rows = explain_rows(cp, msrs, host)
    if a.json:
        emit(rows, True)
        return 0
    emit(rows, False, ["msr", "name", "access", "filter", "kvm", "outcome", "handled_by", "logged",
                       "vmx", "svm"])
    print(f"\nkvm column: {host.describe()}")
    if host.guessing:
        print("note: guessing; an MSR this host's KVM does not implement goes to [unknown] "
              "(or [invalid]), not to 'kernel'")
    return 0


def cmd_policy_diff(a) -> int:
    pa, pb = _compiled(a.a), _compiled(a.b)
    msrs = parse_msrs(a.msrs) if a.msrs else sorted(set(mentioned_msrs(pa)) | set(mentioned_msrs(pb)))
    rows = diff_rows(pa, pb, msrs)
    if not rows and not a.json:
        print(f"no difference for {len(msrs)} MSRs")
        return 0
    emit(rows, a.json)
    return 0


def cmd_policy_export(a) -> int:
    from ..policy.export import export_text, write_export
    if a.output:
        out_path(a.output, "export file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # in the document's "warnings"
        cp = _compiled(a.file)
    if not a.output:
        sys.stdout.write(export_text(cp))
        return 0
    write_export(cp, a.output)
    print(f"{a.output}: policy {cp.policy.name!r}, {len(cp.filter.ranges)}/16 filter ranges, "
          f"exit mask {cp.exit_mask}", file=sys.stderr)
    return 0


def register(sub) -> None:
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
    p = psub.add_parser("explain", help="where each access goes: filter, KVM, handler, VMX/SVM pass-through")
    p.add_argument("file")
    p.add_argument("msrs", nargs="*", metavar="MSR", help="names or indices (default: those the policy lists)")
    p.add_argument("--device", default="/dev/kvm",
                   help="ask this KVM which MSRs it implements (without it: guessed, and said so)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_policy_explain)
    p = psub.add_parser("diff", help="accesses two policies treat differently")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("msrs", nargs="*", metavar="MSR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_policy_diff)
    p = psub.add_parser("export", help="the compiled KVM filter, exit mask and user-space actions "
                                       "as JSON, for VMMs that install it themselves")
    p.add_argument("file")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="kvm-filter-json: see docs/kvm-msr.md §7 and `kvmgate schema kvm-filter`")
    p.add_argument("-o", "--output", metavar="FILE", help="write here (atomically) instead of stdout")
    p.set_defaults(fn=cmd_policy_export)
