"""Views of a compiled policy for people and programs: ranges, explain rows, diffs."""
from __future__ import annotations

from ..msr import bitmaps, names
from ..msr.model import READ, WRITE, X2APIC_FIRST, X2APIC_LAST, KernelMsr, reason_name
from .compile import CompiledPolicy
from .host import GUESS, HostMsrs


def ranges_rows(cp: CompiledPolicy) -> list[dict]:
    rows = []
    for i, r in enumerate(cp.filter.ranges):
        allowed = sum(bin(b).count("1") for b in r.bitmap[:(r.nmsrs + 7) // 8])
        rows.append({"range": i, "flags": {1: "READ", 2: "WRITE", 3: "READ|WRITE"}.get(r.flags, hex(r.flags)),
                     "base": f"{r.base:#x}", "last": f"{r.base + r.nmsrs - 1:#x}", "nmsrs": r.nmsrs,
                     "allowed": allowed, "bitmap": r.bitmap.hex()})
    return rows


def compile_report(cp: CompiledPolicy) -> dict:
    return {"policy": cp.policy.name, "source": cp.policy.source,
            "default": "DEFAULT_DENY" if cp.filter.flags else "DEFAULT_ALLOW",
            "exit_mask": cp.exit_mask,
            "exit_reasons": [reason_name(b) for b in (1, 2, 4) if cp.exit_mask & b],
            "ranges": ranges_rows(cp),
            "user_space_actions": [{"msr": f"{lo:#x}" if lo == hi else f"{lo:#x}..{hi:#x}",
                                    "name": names.describe(lo) if lo == hi else "",
                                    "access": "write" if w else "read", "action": a.kind.value,
                                    "log": a.log, "rule": a.rule}
                                   for lo, hi, w, a in cp.actions.rows()],
            "warnings": cp.warnings}


def mentioned_msrs(cp: CompiledPolicy) -> list[int]:
    out = set()
    for r in cp.policy.rules:
        out.update(range(r.lo, min(r.hi, r.lo + 255) + 1))
    return sorted(out)


def explain_rows(cp: CompiledPolicy, msrs: list[int], host: HostMsrs = GUESS) -> list[dict]:
    """Per MSR and direction: filter verdict, what KVM does (`host`: asked of this host's KVM;
    an MSR it does not implement goes to [unknown]), outcome, handler, VMX/SVM pass-through."""
    rows = []
    for index in msrs:
        hw = bitmaps.passthrough_report(cp.filter, index) if not X2APIC_FIRST <= index <= X2APIC_LAST else None
        for access in (READ, WRITE):
            kind = host.kernel(index, access)
            row = cp.explain(index, access, kind)
            row["kvm"] = kind.value + (" (guess)" if host.guessing else
                                       " (a write of 0)" if access == WRITE and kind is KernelMsr.INVALID else "")
            key = "read" if access == READ else "write"
            if hw is not None:
                row["vmx"] = "pass" if hw[key]["vmx"] else "exit"
                row["svm"] = "pass" if hw[key]["svm"] else "exit"
            else:
                row["vmx"] = row["svm"] = "x2apic"
            rows.append(row)
    return rows


def diff_rows(a: CompiledPolicy, b: CompiledPolicy, msrs: list[int]) -> list[dict]:
    out = []
    keys = ("filter", "outcome", "handled_by", "logged")
    for ra, rb in zip(explain_rows(a, msrs), explain_rows(b, msrs)):
        if any(ra[k] != rb[k] for k in keys):
            out.append({"msr": ra["msr"], "name": ra["name"], "access": ra["access"],
                        "a": f"{ra['handled_by']} [{ra['filter']}]", "b": f"{rb['handled_by']} [{rb['filter']}]"})
    return out
