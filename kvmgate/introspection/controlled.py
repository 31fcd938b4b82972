"""`ControlledMsrs`: the MSRs an introspection tool controls (VCPU_CONTROL_MSR), per vCPU.

One rule for every backend (docs/introspection.md, "2. Messages and commands"):

* an MSR outside the filterable ranges (0-0x1fff, 0xc0000000-0xc0001fff) is -KVM_EINVAL;
* enabling an x2APIC MSR (0x800-0x8ff) is -KVM_EOPNOTSUPP: KVM never filters those, so no
  guest write to one can be intercepted (docs/kvm-msr.md, "3. Whether one guest access is
  allowed");
* enabling an MSR whose guest writes the owner's filter or policy denies is -KVM_EPERM;
* a change of the union over vCPUs goes to the backend's `apply(adding)` (0 or a negative KVM
  code), and an enable it refuses is rolled back, so the set never claims an MSR that is not
  intercepted.

Only the apply step differs between backends: a filter swap on a live `Machine`
(machine_backend.py) or a new "deny writes" set in the shim of a wrapped QEMU
(kvmgate.wrap.introspect).
"""
from __future__ import annotations

import threading
from collections.abc import Callable

from ..msr.model import X2APIC_FIRST, X2APIC_LAST
from . import ids
from .protocol import msr_valid

__all__ = ["ControlledMsrs"]


class ControlledMsrs:
    """{vCPU: MSRs} a tool controls.  `owner_denies(msr)` says whether the owner's filter or
    policy denies guest writes to `msr`; `apply(adding)` makes the interception match `union()`
    and returns 0 or a negative KVM code (`adding`: the change enables an MSR)."""

    def __init__(self, owner_denies: Callable[[int], bool], apply: Callable[[bool], int]):
        self._owner_denies = owner_denies
        self._apply = apply
        self._lock = threading.Lock()
        self._by_vcpu: dict[int, set[int]] = {}

    def union(self) -> frozenset:
        """MSRs the tool controls on some vCPU (what should be intercepted)."""
        with self._lock:
            return frozenset().union(*self._by_vcpu.values()) if self._by_vcpu else frozenset()

    def control(self, vcpu: int, msr: int, enable: bool) -> int:
        """VCPU_CONTROL_MSR: 0 or a negative KVM code (the module docstring's rule)."""
        if not msr_valid(msr):
            return -ids.KVM_EINVAL
        if enable:
            if X2APIC_FIRST <= msr <= X2APIC_LAST:
                return -ids.KVM_EOPNOTSUPP      # KVM never filters x2APIC MSRs
            if self._owner_denies(msr):
                return -ids.KVM_EPERM
        with self._lock:
            had = msr in self._by_vcpu.get(vcpu, ())
            self._set(vcpu, msr, enable)
        if had == enable:
            return 0
        err = self._apply(enable)
        if err and enable:
            with self._lock:
                self._set(vcpu, msr, False)
        return err

    def _set(self, vcpu: int, msr: int, on: bool) -> None:
        s = self._by_vcpu.setdefault(vcpu, set())
        if on:
            s.add(msr)
        else:
            s.discard(msr)
        if not s:
            del self._by_vcpu[vcpu]
