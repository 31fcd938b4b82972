"""The MSR gate of one VM: the owner's filter, exit mask and handler (or a policy bound to the
machine), write interceptions layered over them without weakening them, and the routing of
each MSR exit to its handler.

Kernel rules (docs/kvm-msr.md; kernel Documentation/virt/kvm/api.rst):
KVM_X86_SET_MSR_FILTER replaces the whole filter, KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR)
sets which failure reasons exit to user space; an access the filter denies #GPs in the
kernel unless KVM_MSR_EXIT_REASON_FILTER is in the mask.
"""
from __future__ import annotations

import ctypes as C
import errno
from typing import Callable, NamedTuple

from .. import uapi as u
from ..errors import FilterError, InjectGP, KvmError
from ..msr.model import (EXIT_REASON_FILTER, EXIT_REASON_VALID_MASK, MAX_NMSRS, WRITE,
                         MsrFilter, deny_writes_first)

U32, U64 = u.U32, u.U64


class PolicyBinding(NamedTuple):
    """What `policy.bind(machine, audit, carry)` returns for Machine.set_policy.

    `carry` is state the policy keeps on this machine across swaps (e.g. emulated MSR
    registers): set_policy hands the installed binding's `carry` to the next bind()."""
    filter: MsrFilter | None
    exit_mask: int
    handler: Callable
    policy: object              # what `machine.policy` shows
    carry: object = None


def marshal_filter(flt: MsrFilter) -> tuple[u.kvm_msr_filter, list]:
    """struct kvm_msr_filter for `flt`, bitmaps copied into 64-bit-word buffers (the kernel
    copies ceil(nmsrs/64)*8 bytes).  Returns the struct and the buffers it points to."""
    raw = u.kvm_msr_filter(flags=flt.flags)
    keep = []
    for i, r in enumerate(flt.ranges):
        dst = raw.ranges[i]
        if not r.nmsrs:   # skipped by the kernel: pass u32 garbage through, no bitmap
            dst.flags = r.flags & U32 if isinstance(r.flags, int) else 0
            dst.base = r.base & U32 if isinstance(r.base, int) else 0
            continue
        words = (min(r.nmsrs, MAX_NMSRS + 64) + 63) // 64   # past the limit the kernel reads nothing
        buf = (C.c_uint64 * words)()
        n = min(len(r.bitmap), words * 8)
        C.memmove(buf, bytes(r.bitmap[:n]), n)
        keep.append(buf)
        dst.flags, dst.nmsrs, dst.base = r.flags, r.nmsrs, r.base
        dst.bitmap = C.addressof(buf)
    return raw, keep


class Interception:
    """One registration of `MsrGate.add_interception`: guest WRMSRs of `msrs` go to
    `callback(exit)` (and to `native` first, when the exit loop has a C path for it).
    update(msrs) changes the set, remove() ends it."""

    def __init__(self, gate: "MsrGate", msrs: frozenset, callback: Callable, native=None):
        self.gate, self.msrs, self.callback, self.native = gate, msrs, callback, native

    def update(self, msrs) -> None:
        self.gate._change(self, frozenset(msrs))

    def remove(self) -> None:
        self.gate._change(self, None)


class MsrGate:
    """`vm`: the Vm fd object; `quiesced`: the machine's context manager that holds the other
    vCPUs outside KVM_RUN (every change here is installed whole under it)."""

    def __init__(self, vm, quiesced: Callable):
        self.vm = vm
        self._quiesced = quiesced
        self.exit_mask = 0                        # the owner's mask
        self.msr_filter: MsrFilter | None = None  # the owner's filter
        self.policy = None                        # the bound policy, if any
        self._owner: Callable | None = None       # the owner's on_msr or policy handler
        self._carry = None
        self._interceptions: tuple[Interception, ...] = ()
        self._slot: Interception | None = None    # intercept_msr_writes' registration
        self.handler: Callable | None = None      # what the exit loop calls
        self._native: tuple = (None, ())         # native_interception()

    @property
    def owner(self) -> Callable | None:
        """The owner's handler (on_msr, or the bound policy's), without the interception router."""
        return self._owner

    @property
    def intercepted(self) -> frozenset:
        """The MSR indices whose guest writes interceptions take (see _routing_handler)."""
        return self._intercepted()

    # ---- the owner's side
    def on_msr(self, fn: Callable | None) -> None:
        """The owner's handler; while the VM runs, every vCPU calls `fn` from its next exit on
        (the C run loop holds the handler it was given: quiescing brings it back to Python)."""
        with self._quiesced():
            self._owner = fn
            self.handler = self._routing_handler()

    def enable_user_space_msr(self, mask: int) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR): which failure reasons exit to user space
        (interceptions add FILTER).  The interception router is rebuilt with the new mask, under
        the quiesce, so it never answers by an older one."""
        if not isinstance(mask, int) or not 0 <= mask <= U64:
            raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP", self.vm, f"mask {mask!r} is not a u64")
        with self._quiesced():                    # the router answers by the owner's mask
            self.vm.enable_cap(u.KVM_CAP_X86_USER_SPACE_MSR,
                               mask | (EXIT_REASON_FILTER if self._intercepted() else 0))
            self.exit_mask = mask & EXIT_REASON_VALID_MASK
            self.handler = self._routing_handler()

    def set_msr_filter(self, flt: MsrFilter | None) -> None:
        """KVM_X86_SET_MSR_FILTER; None removes filtering.  Validated first: a rejected filter
        raises FilterError with the kernel's errno and leaves the installed filter untouched.
        The interception router is rebuilt with the new filter, under the quiesce, so it never
        lets an intercepted write through that the owner's filter now denies."""
        new = flt if flt is not None else MsrFilter()
        new.validate()
        msrs = self._intercepted()
        if msrs:
            new = deny_writes_first(new, msrs)
        raw, _bitmaps = marshal_filter(new)       # _bitmaps: alive until the ioctl returns
        with self._quiesced():                    # the router answers by the owner's filter
            try:
                self.vm.set_msr_filter(raw)
            except KvmError as e:
                raise FilterError(f"kernel rejected the filter: {e.strerror}", e.errno) from None
            self.msr_filter = flt
            self.handler = self._routing_handler()

    def set_policy(self, machine, policy, audit=None) -> None:
        """Bind and install filter, exit mask and handler whole (see Machine.set_policy)."""
        b = policy.bind(machine, audit, self._carry)
        with self._quiesced():
            old = self.msr_filter
            self.set_msr_filter(b.filter)
            try:
                self.enable_user_space_msr(b.exit_mask)
            except KvmError:
                self.set_msr_filter(old)
                raise
            self._owner = b.handler
            self.handler = self._routing_handler()
            self.policy, self._carry = b.policy, b.carry

    # ---- interceptions layered over the owner's gate
    def add_interception(self, msrs, callback: Callable, native=None) -> Interception:
        """Send guest WRMSRs of `msrs` to callback(exit) -> value to store (None: the guest's),
        or InjectGP; layered over the owner's filter, mask and handler, never weakening them
        (writes the owner's filter denies still go to the owner).  Several registrations may
        exist; for an MSR in several, the first registered gets the write.  FilterError if
        the filter has no room left (nothing changes then).

        `native`: an explicit registration of a C path for these writes, which the C exit
        loop may answer a write with before the callback (an introspection EventPort,
        kvmgate/introspection/fast_events.py); what it leaves still reaches the callback.
        See native_interception()."""
        reg = Interception(self, frozenset(), callback, native)
        self._change(reg, frozenset(msrs))
        return reg

    def intercept_msr_writes(self, msrs, callback: Callable | None, native=None) -> None:
        """One replaceable interception (an empty set or None callback removes it)."""
        if self._slot is not None:
            if msrs and callback is not None:
                self._slot.callback = callback
                self._slot.native = native
                self._slot.update(msrs)
                return
            self._slot.remove()
            self._slot = None
        if msrs and callback is not None:
            self._slot = self.add_interception(msrs, callback, native)

    def _change(self, reg: Interception, msrs: frozenset | None) -> None:
        """Install `reg` with `msrs` (None: remove it), whole, or raise and change nothing."""
        with self._quiesced():
            old_regs, old_msrs = self._interceptions, reg.msrs
            others = tuple(r for r in old_regs if r is not reg)
            self._interceptions = others if msrs is None or not msrs else \
                (old_regs if reg in old_regs else old_regs + (reg,))
            reg.msrs = msrs or frozenset()
            try:
                self.set_msr_filter(self.msr_filter)
                self.enable_user_space_msr(self.exit_mask)
            except KvmError:
                self._interceptions, reg.msrs = old_regs, old_msrs
                self.set_msr_filter(self.msr_filter)
                raise
            # the handler: rebuilt with the new interceptions by the two calls above

    def _intercepted(self) -> frozenset:
        return frozenset().union(*(r.msrs for r in self._interceptions))

    def native_interception(self) -> tuple:
        """(native, sorted MSRs) for the exit loop's C path: the first registration with a
        `native`, and the MSRs whose FILTER writes the router would give to its callback (the
        first registered wins; the owner's filter allows the write); (None, ()) when none.
        Rebuilt with the handler, under the quiesce of every change."""
        return self._native

    def _routing_handler(self) -> Callable | None:
        """The owner's handler, or, while writes are intercepted, a router in front of it."""
        owner = self._owner
        self._native = (None, ())
        if not self._interceptions:
            return owner
        table, first = {}, {}
        for reg in reversed(self._interceptions):      # the first registered wins
            for i in reg.msrs:
                table[i] = reg.callback
                first[i] = reg
        owner_filter = self.msr_filter or MsrFilter()
        owner_mask = self.exit_mask
        native = next((r.native for r in self._interceptions if r.native is not None), None)
        if native is not None:
            self._native = (native, tuple(sorted(
                i for i, reg in first.items()
                if reg.native is native and owner_filter.allows(i, WRITE))))

        def route(ex):
            if ex.reason == EXIT_REASON_FILTER:
                callback = table.get(ex.index) if ex.is_write else None
                if callback is not None and owner_filter.allows(ex.index, WRITE):
                    value = callback(ex)
                    if value is InjectGP:
                        return InjectGP
                    stored = ex.host_access(ex.data if value is None else value & U64)
                    return InjectGP if stored is None else None
                if not owner_mask & EXIT_REASON_FILTER:
                    return InjectGP            # what KVM would have done for the owner
            return InjectGP if owner is None else owner(ex)
        return route
