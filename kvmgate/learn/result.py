"""What learning found: one LearnedAccess per (MSR, direction), and the LearnResult."""
from __future__ import annotations

import datetime as _dt
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..msr import names
from ..msr.model import KernelMsr

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


@dataclass
class LearnResult:
    accesses: list[LearnedAccess]        # sorted by (index, write)
    recorder: str                        # "tracefs" or "exits"
    guest: str                           # what ran (a path or "<assembly>" / "<binary>")
    halted: bool                         # False: stopped at the timeout
    seconds: float
    events: int
    gp_faults: int | None                # #GPs the guest runtime reported (None on timeout)
    guarded: tuple[int, ...] = ()        # MSRs carried out from user space under tracefs
    notes: list[str] = field(default_factory=list)
    trace: object = None                 # the events as a kvmgate.trace.Trace
    meta: dict = field(default_factory=dict)

    def allowed(self) -> list[LearnedAccess]:
        return [a for a in self.accesses if a.allowed]

    def refused(self) -> list[LearnedAccess]:
        return [a for a in self.accesses if not a.allowed]

    def access(self, index: int, write: bool) -> LearnedAccess | None:
        for a in self.accesses:
            if a.index == index and a.write == bool(write):
                return a
        return None

    def policy_text(self, name: str | None = None, *, min_run: int = MIN_RUN,
                    exclude: Iterable = ()) -> str:
        """The learned policy as TOML (parsed and compiled before it is returned).
        `exclude`: MSR indices, or (index, write) pairs, to leave out (denied by the default)."""
        stem = Path(self.guest).stem if not self.guest.startswith("<") else "guest"
        from .render import render_policy
        return render_policy(self.accesses, name=name or f"learned-{stem}", min_run=min_run,
                             exclude=exclude, header=self._header())

    def policy(self, **kw):
        from ..policy import parse_policy
        return parse_policy(self.policy_text(**kw), "<learned>")

    def _header(self) -> list[str]:
        how = {"tracefs": "the kernel's kvm:kvm_msr tracepoint (tracefs)",
               "exits": "user-space MSR exits (every MSR filtered, carried out with KVM_GET/SET_MSRS)"}
        lines = [f"Learned by `kvmgate learn` from {self.guest}",
                 f"on {platform.node()} (Linux {platform.release()}), "
                 f"{_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
                 f"recorder: {how.get(self.recorder, self.recorder)}",
                 f"guest {'halted' if self.halted else 'stopped at the timeout'} after "
                 f"{self.seconds:.3f} s: {self.events} MSR accesses, {len(self.accesses)} "
                 f"MSR/direction pairs, {len(self.allowed())} allowed"]
        if self.guarded:
            lines.append(f"{len(self.guarded)} MSRs KVM may pass through to the guest were "
                         "filtered and carried out from user space while learning")
        return lines + self.notes

    def to_dict(self) -> dict:
        return {"guest": self.guest, "recorder": self.recorder, "halted": self.halted,
                "seconds": round(self.seconds, 6), "events": self.events,
                "gp_faults": self.gp_faults, "guarded": [f"{m:#x}" for m in self.guarded],
                "allowed": len(self.allowed()), "refused": len(self.refused()),
                "notes": self.notes, "accesses": [a.to_dict() for a in self.accesses]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)
