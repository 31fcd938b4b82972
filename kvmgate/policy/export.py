"""A compiled policy as a versioned JSON document, for VMM authors who install it with their
own code: `kvmgate policy export --format kvm-filter-json POLICY`.

The document (format "kvmgate-kvm-filter", version 1; JSON Schema: kvmgate/schemas/
kvm-filter.schema.json, `kvmgate schema kvm-filter`; described in docs/kvm-msr.md §7) holds:

- `filter`: the argument of KVM_X86_SET_MSR_FILTER (docs/kvm-msr.md §1-§3): `flags`
  (KVM_MSR_FILTER_DEFAULT_ALLOW 0 / _DEFAULT_DENY 1) and up to 16 `ranges`, each `flags`
  (KVM_MSR_FILTER_READ 1 | _WRITE 2), `base`, `nmsrs` and `bitmap`: ceil(nmsrs / 8) bytes in
  hex, MSR base + k is bit k % 8 of byte k // 8, a set bit allows;
- `exit_mask`: the KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR) args[0] (docs/kvm-msr.md §4),
  with its reasons by name;
- `actions`: what user space answers to each exit, per reason: for FILTER exits the rules per
  MSR span and direction, then `default` for MSRs listed nowhere; for UNKNOWN and INVAL one
  answer each (null: reply #GP, no record).

Integers that fit in 32 bits are JSON numbers; 64-bit values (constants, masks, initial
values) are "0x..." strings, which every JSON parser keeps exact.  `load_export` reads a
document back (checked) into the filter and exit mask, so the round trip is testable.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import PolicyError, UserError
from ..msr.model import (DEFAULT_DENY, EXIT_REASON_VALID_MASK, MAX_RANGES, READ, WRITE,
                         MsrFilter, MsrRange, reason_name)
from .compile import CompiledPolicy
from .model import Action, ActionKind

FORMAT = "kvmgate-kvm-filter"
VERSION = 1
FORMATS = ("kvm-filter-json",)
FLAG_NAMES = {READ: "READ", WRITE: "WRITE"}
REASON_BITS = (1, 2, 4)          # KVM_MSR_EXIT_REASON_INVAL, _UNKNOWN, _FILTER


def _hex64(v: int) -> str:
    return f"{v:#x}"


def action_json(act: Action | None) -> dict | None:
    """One user-space answer; None (JSON null) is "reply #GP, write no record"."""
    if act is None:
        return None
    d: dict[str, Any] = {"action": act.kind.value, "log": act.log, "rule": act.rule}
    if act.kind is ActionKind.CONSTANT:
        d |= {"value": _hex64(act.value), "writes": act.writes}
    elif act.kind is ActionKind.EMULATE:
        d |= {"initial": _hex64(act.initial), "write_mask": _hex64(act.write_mask),
              "allowed": None if act.allowed is None else [_hex64(v) for v in act.allowed]}
    return d


def _spans(cp: CompiledPolicy) -> list[dict]:
    """The FILTER-exit rules: runs of consecutive MSRs with one answer, sorted by (first, access)."""
    merged: dict[bool, list[list]] = {False: [], True: []}
    for lo, hi, write, act in cp.actions.rows():
        runs = merged[write]
        if runs and runs[-1][1] + 1 == lo and runs[-1][2] == act:
            runs[-1][1] = hi
        else:
            runs.append([lo, hi, act])
    out = [{"first": lo, "last": hi, "access": "write" if w else "read", **action_json(act)}
           for w, runs in merged.items() for lo, hi, act in runs]
    return sorted(out, key=lambda d: (d["first"], d["access"]))


def _range_json(r: MsrRange) -> dict:
    need = (r.nmsrs + 7) // 8
    return {"flags": r.flags, "access": [n for b, n in FLAG_NAMES.items() if r.flags & b],
            "base": r.base, "nmsrs": r.nmsrs, "last": r.base + r.nmsrs - 1,
            "bitmap": r.bitmap[:need].ljust(need, b"\0").hex()}


def export_kvm_filter(cp: CompiledPolicy) -> dict:
    """The document for `cp` (see the module docstring); pure, no KVM."""
    flt = cp.filter
    pol = cp.policy
    return {
        "format": FORMAT,
        "version": VERSION,
        "policy": {"name": pol.name, "source": pol.source, "mode": pol.mode,
                   "audit_rate": pol.audit_rate, "audit_burst": pol.audit_burst},
        "filter": {"flags": flt.flags,
                   "default": "DEFAULT_DENY" if flt.flags & DEFAULT_DENY else "DEFAULT_ALLOW",
                   "ranges": [_range_json(r) for r in flt.ranges]},
        "exit_mask": cp.exit_mask,
        "exit_reasons": [reason_name(b) for b in REASON_BITS if cp.exit_mask & b],
        "actions": {"filter": {"rules": _spans(cp), "default": action_json(cp.default_action)},
                    "unknown": action_json(cp.unknown),
                    "invalid": action_json(cp.invalid)},
        "warnings": list(cp.warnings),
    }


def export_text(cp: CompiledPolicy, indent: int | None = 2) -> str:
    """The document as JSON text (a trailing newline)."""
    return json.dumps(export_kvm_filter(cp), indent=indent) + "\n"


def write_export(cp: CompiledPolicy, path) -> Path:
    """Write the document to `path` atomically (aside, then renamed; a character device such
    as /dev/stdout is written directly).  UserError if it cannot be written."""
    text = export_text(cp)
    p = Path(path)
    try:
        if p.exists() and stat.S_ISCHR(p.stat().st_mode):
            with open(p, "w") as fh:
                fh.write(text)
            return p
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(text)
            os.replace(tmp, p)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as e:
        raise UserError(f"cannot write the export: {e.strerror}", str(p)) from None
    return p


# ---- reading a document back

def _need(cond: bool, what: str) -> None:
    if not cond:
        raise PolicyError(f"not a {FORMAT} document: {what}", "export")


def _u32(v, what: str) -> int:
    _need(type(v) is int and 0 <= v <= 0xFFFFFFFF, f"{what} is not a u32")
    return v


def load_export(doc: dict) -> tuple[MsrFilter, int]:
    """The filter and exit mask of an exported document, checked (PolicyError if malformed;
    the filter also passes MsrFilter.validate(), the kernel's own checks)."""
    _need(isinstance(doc, dict) and doc.get("format") == FORMAT, "format")
    _need(doc.get("version") == VERSION, f"version {doc.get('version')!r} (this kvmgate reads {VERSION})")
    f = doc.get("filter")
    _need(isinstance(f, dict) and isinstance(f.get("ranges"), list), "filter")
    _need(len(f["ranges"]) <= MAX_RANGES, f"more than {MAX_RANGES} ranges")
    ranges = []
    for i, r in enumerate(f["ranges"]):
        _need(isinstance(r, dict), f"range {i}")
        n = _u32(r.get("nmsrs"), f"range {i} nmsrs")
        bits = r.get("bitmap")
        _need(isinstance(bits, str), f"range {i} bitmap")
        try:
            raw = bytes.fromhex(bits)
        except ValueError:
            raise PolicyError(f"not a {FORMAT} document: range {i} bitmap is not hex", "export") from None
        _need(len(raw) == (n + 7) // 8, f"range {i} bitmap has {len(raw)} bytes, nmsrs {n} needs {(n + 7) // 8}")
        ranges.append(MsrRange(_u32(r.get("flags"), f"range {i} flags"), _u32(r.get("base"), f"range {i} base"),
                               n, raw))
    flt = MsrFilter(ranges, _u32(f.get("flags"), "filter flags"))
    mask = _u32(doc.get("exit_mask"), "exit_mask")
    _need(not mask & ~EXIT_REASON_VALID_MASK, "exit_mask has bits outside 7")
    flt.validate()
    return flt, mask


__all__ = ["export_kvm_filter", "export_text", "write_export", "load_export", "action_json", "FORMAT", "VERSION",
           "FORMATS"]
