"""The learned policy as TOML in kvmgate's format: exact runs as ranges, the rest as named
lists, reads and writes apart, refused accesses as comments."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from ..errors import PolicyError, UserError
from ..msr import names
from ..msr.model import X2APIC_FIRST, X2APIC_LAST, consecutive_runs
from ..policy import compile_policy, parse_policy
from .access import MIN_RUN, LearnedAccess

def _msr_ref(index: int) -> str:
    """A TOML value naming the MSR: its canonical name when that resolves back, else hex."""
    n = names.msr_name(index)
    return json.dumps(n) if n and names.msr_index(n) == index else f"{index:#x}"


def _times(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _hexes(values: tuple[int, ...]) -> str:
    return ", ".join(f"{v:#x}" for v in values[:3]) + (", ..." if len(values) > 3 else "")


def _describe(index: int, by: dict) -> str:
    """A comment for one MSR: events per direction, written values, #GPs."""
    parts = []
    for write in (False, True):
        a = by.get((index, write))
        if a is None:
            continue
        text = _times(a.events, "write" if write else "read")
        if write and a.values:
            text += f" ({_hexes(a.values)})"
        if a.failed:
            text += f", {a.failed} #GP"
        parts.append(text)
    if X2APIC_FIRST <= index <= X2APIC_LAST:
        parts.append("x2APIC: never filtered")
    return "; ".join(parts)


def render_policy(accesses: Iterable[LearnedAccess], *, name: str = "learned", min_run: int = MIN_RUN,
                  exclude: Iterable = (), header: Iterable[str] = ()) -> str:
    """Deny-by-default TOML allowing the allowed accesses (see the module docstring)."""
    accesses = list(accesses)
    drop_msrs = {x for x in exclude if isinstance(x, int)}
    drop_keys = {(int(x[0]), bool(x[1])) for x in exclude if not isinstance(x, int)}
    by = {(a.index, a.write): a for a in accesses}
    ok = [a for a in accesses if a.allowed and a.index not in drop_msrs
          and (a.index, a.write) not in drop_keys]
    reads = {a.index for a in ok if not a.write}
    writes = {a.index for a in ok if a.write}
    out = [f"# {line}" for line in header]
    out += ["[policy]", f"name = {json.dumps(name)}",
            'default = "deny"          # anything the guest was not seen to use: #GP',
            "log = true                # ... and an audit record", ""]
    nrules = 0
    for cls, access, title in ((reads & writes, "both", "read and written"),
                               (reads - writes, "read", "read only"),
                               (writes - reads, "write", "written only")):
        if not cls:
            continue
        out.append(f"# ---- {title}: {_times(len(cls), 'MSR')}")
        singles = []
        for first, last in consecutive_runs(sorted(cls)):
            run = list(range(first, last + 1))
            if len(run) < max(2, min_run):
                singles += run
                continue
            lo, hi = run[0], run[-1]
            ends = f"{names.describe(lo)} .. {names.describe(hi)}"
            out += [f"[[rule]]                  # {len(run)} MSRs {lo:#x}..{hi:#x}: {ends}",
                    f"range = [{_msr_ref(lo)}, {_msr_ref(hi)}]",
                    f'access = "{access}"', 'action = "allow"', ""]
            nrules += 1
        if singles:
            out += ["[[rule]]", f'access = "{access}"', 'action = "allow"', "msrs = ["]
            refs = [_msr_ref(i) + "," for i in singles]
            width = max(len(r) for r in refs)
            for i, ref in zip(singles, refs):
                out.append(f"    {ref.ljust(width)}  # {i:#x}: {_describe(i, by)}")
            out += ["]", ""]
            nrules += 1
    if not nrules:
        out += ["# (no MSR access to allow)", ""]
    refused = [a for a in accesses if not a.allowed]
    if refused:
        out.append("# ---- not allowed: the guest gets the same #GP it got when learning, "
                   "from the default deny (logged)")
        for a in refused:
            vals = f" of {_hexes(a.failed_values or a.values)}" if a.write else ""
            x2 = ("; x2APIC: never filtered, KVM's own #GP" if X2APIC_FIRST <= a.index <= X2APIC_LAST
                  else "")
            out.append(f"#   {a.index:#x} {names.describe(a.index)} {a.direction}{vals}: "
                       f"{_times(a.events, 'time')}: {a.why_not()}{x2}")
        out.append("")
    dropped = sorted({(a.index, a.write) for a in accesses if a.allowed} - {(a.index, a.write) for a in ok})
    if dropped:
        out.append("# ---- left out on request (denied although the guest used them)")
        out += [f"#   {i:#x} {names.describe(i)} {'write' if w else 'read'}" for i, w in dropped]
        out.append("")
    out += ["[unknown]                 # MSRs KVM does not implement: #GP, as KVM would",
            'action = "gp"', "",
            "[invalid]                 # accesses KVM refuses: #GP, as KVM would",
            'action = "gp"', ""]
    text = "\n".join(out)
    try:
        compile_policy(parse_policy(text, "<learned>"))
    except PolicyError as e:
        raise PolicyError(f"the learned policy cannot be enforced: {e.what}", e.where) from None
    return text


def write_policy(result, path, **kw) -> Path:
    """Write the learned policy (policy text, or anything with policy_text(**kw) such as a
    LearnResult) to `path` atomically.  UserError if it cannot be written."""
    text = result if isinstance(result, str) else result.policy_text(**kw)
    p = Path(path)
    if p.is_dir():
        raise UserError("is a directory", str(p))
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, p)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise UserError(f"cannot write policy: {e.strerror}", str(p)) from None
    return p
