"""What the tool has set up on one KVMI connection (docs/introspection.md §2-§3): the VM and
vCPU events it enabled, the MSRs it controls, its pending PAUSE_VCPU requests and the vCPUs
waiting for its replies, all under one lock; and the owner's queries on them.

`IntrospectionServer` is a `ToolState`: its commands (command_handlers.py) change this state,
its events read it, and closing the connection clears it.
"""
from __future__ import annotations

import threading

from . import ids
from .inbox import Waiter
from .permissions import Permissions

__all__ = ["ToolState"]


class ToolState:
    """The state of one connection that the tool controls (see the module docstring)."""

    def __init__(self, permissions: Permissions):
        self._perms = permissions
        self._lock = threading.Lock()
        self._closed = False
        self._vm_events: set[int] = set()
        self._vcpu_events: dict[int, set[int]] = {}
        self._msrs: dict[int, set[int]] = {}
        self._pauses: dict[int, int] = {}
        self._waiting: dict[int, Waiter] = {}

    def msr_wanted(self, vcpu: int, msr: int) -> bool:
        """Whether a guest write to `msr` on `vcpu` would be sent to the tool (if it changes the
        value): controlled, MSR event enabled on that vCPU and allowed, connection open."""
        if self._closed:
            return False
        msrs = self._msrs.get(vcpu)
        if not msrs or msr not in msrs:
            return False
        evs = self._vcpu_events.get(vcpu)
        return bool(evs) and ids.VCPU_EVENT_MSR in evs \
            and self._perms.event_allowed(ids.VCPU_EVENT_MSR)

    def wanted_msr_events(self) -> dict[int, list[int]]:
        """{vcpu: sorted MSRs} whose guest writes msr_wanted() says go to the tool."""
        with self._lock:
            if self._closed or not self._perms.event_allowed(ids.VCPU_EVENT_MSR):
                return {}
            return {v: sorted(ms) for v, ms in self._msrs.items()
                    if ms and ids.VCPU_EVENT_MSR in self._vcpu_events.get(v, ())}

    def _take_pause(self, vcpu: int) -> bool:
        with self._lock:
            n = self._pauses.get(vcpu, 0)
            if n == 0:
                return False
            if n == 1:
                del self._pauses[vcpu]
            else:
                self._pauses[vcpu] = n - 1
            return True

    def pending_pauses(self, vcpu: int) -> int:
        return self._pauses.get(vcpu, 0)

    # --- queries for the owner / the lead -------------------------------------------------

    def controlled_msrs(self, vcpu: int) -> frozenset:
        return frozenset(self._msrs.get(vcpu, ()))

    def enabled_events(self, vcpu: int | None = None) -> frozenset:
        """Events the tool enabled on `vcpu` (None: VM events)."""
        if vcpu is None:
            return frozenset(self._vm_events)
        return frozenset(self._vcpu_events.get(vcpu, ()))

    def waiting(self, vcpu: int) -> bool:
        """True while `vcpu` is blocked waiting for an event reply."""
        return vcpu in self._waiting
