"""The result of learning: the accesses found and how they were found, and its policy text."""
from __future__ import annotations

import datetime as _dt
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..policy import parse_policy
from .access import MIN_RUN, LearnedAccess
from .render import render_policy


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
        if self.recorder == "trace":
            default = "learned-from-traces"
        else:
            default = "learned-" + (Path(self.guest).stem if not self.guest.startswith("<") else "guest")
        return render_policy(self.accesses, name=name or default, min_run=min_run,
                             exclude=exclude, header=self._header())

    def policy(self, **kw):
        return parse_policy(self.policy_text(**kw), "<learned>")

    def _header(self) -> list[str]:
        how = {"tracefs": "the kernel's kvm:kvm_msr tracepoint (tracefs)",
               "exits": "user-space MSR exits (every MSR filtered, carried out with KVM_GET/SET_MSRS)",
               "trace": "recorded traces (kvmgate learn --from-trace)"}
        lines = [f"Learned by `kvmgate learn` from {self.guest}",
                 f"on {platform.node()} (Linux {platform.release()}), "
                 f"{_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
                 f"recorder: {how.get(self.recorder, self.recorder)}"]
        if self.recorder == "trace":
            lines.append(f"{self.events} MSR accesses, {len(self.accesses)} MSR/direction pairs, "
                         f"{len(self.allowed())} allowed")
        else:
            lines.append(f"guest {'halted' if self.halted else 'stopped at the timeout'} after "
                         f"{self.seconds:.3f} s: {self.events} MSR accesses, {len(self.accesses)} "
                         f"MSR/direction pairs, {len(self.allowed())} allowed")
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
