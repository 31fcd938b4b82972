"""IntrospectionCrash: the tool answered an event with CRASH (docs/introspection.md §3)."""
from __future__ import annotations

from ..exits import GuestError
from . import ids


class IntrospectionCrash(GuestError):
    """The introspection tool answered an event with CRASH: the VM was stopped."""

    def __init__(self, vcpu: int, event: int, msr: int | None = None, rip: int | None = None):
        what = ids.event_name(event) + (f" (MSR {msr:#x})" if msr is not None else "")
        super().__init__(f"vCPU {vcpu}: the introspection tool answered {what} with CRASH",
                         vcpu, rip)
        self.event = event
        self.msr = msr
