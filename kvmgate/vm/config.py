"""Machine's configuration methods, as a mixin: the MSR handler, #GP and port handlers, and
the MSR gate's settings (filter, user-space exit mask, policy, interceptions), which delegate
to vm.gate.MsrGate (docs/kvm-msr.md, "2. Installing a filter: what the kernel checks, in
order" and "4. Exits to user space and how to answer them")."""
from __future__ import annotations

from typing import Callable

from .gate import Interception, MsrGate


class Configuration:
    """Needs `gate` (the machine's MsrGate); keeps the #GP handler and the port handlers the
    exit loop is given at each run."""
    gate: MsrGate
    _gp_handler: Callable | None
    _port_handlers: dict[int, Callable]

    def on_msr(self, fn: Callable) -> Callable:
        """Register the handler for every MSR exit: fn(exit) -> value | None; raise InjectGP for
        #GP.  `exit` is an MsrExit: .index .is_write .data .reason .vcpu, .regs(), .host_access()."""
        self.gate.on_msr(fn)
        return fn

    def on_gp(self, fn: Callable) -> Callable:
        """Register fn(fault) called as each guest RDMSR/WRMSR #GP is recorded."""
        self._gp_handler = fn
        return fn

    def on_port(self, port: int, fn: Callable | None = None) -> Callable:
        """fn(machine, value) for guest OUT to `port` (its return value answers IN):
        `m.on_port(0x80, fn)`, or as a decorator `@m.on_port(0x80)`."""
        def register(fn):
            self._port_handlers[port] = fn
            return fn
        return register if fn is None else register(fn)

    def enable_user_space_msr(self, mask: int) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR): which failure reasons exit to user space."""
        self.gate.enable_user_space_msr(mask)

    def set_msr_filter(self, flt) -> None:
        """KVM_X86_SET_MSR_FILTER; None removes filtering.  Validated first: a rejected filter
        raises FilterError with the kernel's errno and leaves the installed filter untouched."""
        self.gate.set_msr_filter(flt)

    @property
    def msr_filter(self):
        """The owner's filter (interceptions are layered over it in the kernel's copy)."""
        return self.gate.msr_filter

    @property
    def exit_mask(self) -> int:
        """The owner's user-space exit mask."""
        return self.gate.exit_mask

    @property
    def policy(self):
        """The policy installed with set_policy (what its bind() returned as `policy`), or None."""
        return self.gate.policy

    def set_policy(self, policy, audit=None) -> None:
        """Swap filter, exit mask and handler table atomically, also while the guest runs.

        `policy` is anything with bind(machine, audit, carry) -> vm.PolicyBinding, e.g. a
        kvmgate.policy Policy or CompiledPolicy, which compile and validate first.  Every other
        vCPU is then parked outside KVM_RUN, so no access sees one policy's filter with the
        other's handlers.  A failure changes nothing."""
        self.gate.set_policy(self, policy, audit)

    def add_interception(self, msrs, callback: Callable, native=None) -> Interception:
        """See MsrGate.add_interception: guest WRMSRs of `msrs` to callback(exit), layered over
        the owner's gate; returns a handle with update(msrs) and remove().  `native`: a C
        path the exit loop may answer them with first (see MsrGate.add_interception)."""
        return self.gate.add_interception(msrs, callback, native)

    def intercept_msr_writes(self, msrs, callback: Callable | None, native=None) -> None:
        """One replaceable interception: guest WRMSRs of `msrs` to callback(exit) -> value to
        store (None: the guest's) or InjectGP; an empty set or None callback removes it."""
        self.gate.intercept_msr_writes(msrs, callback, native)
