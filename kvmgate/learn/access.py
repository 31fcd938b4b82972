"""What learning found per (MSR, direction): LearnedAccess, and how it is derived from a
trace's key summary (the same for a live run and for recorded traces)."""
from __future__ import annotations

from dataclasses import dataclass

from ..msr import names
from ..msr.model import KernelMsr
from ..trace.summary import Summary

MAX_VALUES = 4            # distinct values kept per (MSR, direction, outcome)
MIN_RUN = 3               # consecutive MSRs that become a `range` rule


@dataclass
class LearnedAccess:
    """Everything seen for one MSR in one direction."""
    index: int
    write: bool
    events: int = 0
    failed: int = 0                      # events the guest got #GP for (KVM failed them)
    values: tuple[int, ...] = ()         # up to MAX_VALUES distinct values of completed events
    failed_values: tuple[int, ...] = ()  # ... and of failed ones (written values; reads: 0)
    first_ns: int = 0
    forwarded: bool = False              # carried out from user space (host-initiated)
    check: str | None = None             # forwarded: guest-initiated re-check (KernelMsr value)

    @property
    def name(self) -> str | None:
        return names.msr_name(self.index)

    @property
    def direction(self) -> str:
        return "write" if self.write else "read"

    @property
    def allowed(self) -> bool:
        """Used successfully (and, if carried out from user space, valid as a guest access)."""
        if self.forwarded and self.check is not None:
            return self.check == KernelMsr.HANDLED.value
        return self.events > self.failed

    def why_not(self) -> str:
        if self.allowed:
            return ""
        if self.forwarded and self.check is not None:
            if self.failed < self.events:
                return (f"KVM_{'SET' if self.write else 'GET'}_MSRS worked, but KVM fails the "
                        f"guest's own access ({self.check})")
            return f"KVM itself answered #GP ({self.check})"
        return "KVM itself answered #GP"

    def to_dict(self) -> dict:
        return {"msr": f"{self.index:#x}", "name": self.name, "access": self.direction,
                "events": self.events, "gp": self.failed, "allowed": self.allowed,
                "values": [f"{v:#x}" for v in self.values],
                "failed_values": [f"{v:#x}" for v in self.failed_values],
                "forwarded": self.forwarded, "check": self.check, "reason": self.why_not()}


def accesses_from_summary(summary: Summary) -> dict[tuple[int, bool], LearnedAccess]:
    """Per (index, write), over every host of `summary`: events, #GPs, first time, up to
    MAX_VALUES distinct values of completed and of failed events."""
    out: dict[tuple[int, bool], LearnedAccess] = {}
    vals: dict[tuple[int, bool, bool], set[int]] = {}
    _, index, write, exc = (a.tolist() for a in summary.columns())
    count, first = summary.count.tolist(), summary.first_ns.tolist()
    values = summary.values_of()
    for k in range(len(summary)):
        key = (index[k], bool(write[k]))
        a = out.get(key)
        if a is None:
            a = out[key] = LearnedAccess(index[k], bool(write[k]), first_ns=first[k])
        a.events += count[k]
        a.failed += count[k] if exc[k] else 0
        a.first_ns = min(a.first_ns, first[k])
        vals.setdefault((index[k], bool(write[k]), bool(exc[k])), set()).update(values[k])
    for (i, w, e), s in vals.items():
        kept = tuple(sorted(s)[:MAX_VALUES])
        if e:
            out[(i, w)].failed_values = kept
        else:
            out[(i, w)].values = kept
    return out
