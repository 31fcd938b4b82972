"""Replay verdicts for a compiled policy: what the policy would have done with each recorded access.

Nothing here restates the kernel or the policy: every verdict is kvmgate.engine.replay_verdict,
whose kernel part is `msr.model.outcome()` (filter first, then KVM's own emulation, then the exit
mask; docs/kvm-msr.md) and whose policy part is the C engine that the live exit path and the QEMU
shim use (or, when kvmgate was installed without a C compiler, the Python exit path's own action
code).  This module only adapts it to kvmgate.trace.replay()'s decide(index, write, exception).

Verdicts (strings, as replay() counts them):

    kernel      the filter lets it through and KVM completes it
    deny        #GP by the policy: the filter denies it and the rule (or the default) is deny,
                or the filter denies it with no user-space exit, or a `constant` rule with
                writes = "gp" meets a write
    ignore      answered from user space: reads 0, writes dropped ([unknown]/[invalid] ignore too)
    constant    answered from user space with the rule's value (writes dropped)
    emulate     a user-space register (a write of a value the rule refuses is #GP: the verdict
                cannot see values, so it says emulate)
    forward     allow + log: carried out from user space with KVM_GET/SET_MSRS and logged
    gp-kernel   the filter lets it through and KVM fails it itself (#GP), as when recorded

A traced #GP (exception flag) does not say whether KVM did not know the MSR (exit reason
UNKNOWN) or refused the access (INVAL).  Pass `kernel(index, write) -> KernelMsr` to say; without
it, where the policy treats the two differently the verdict names both, e.g. "gp-kernel|ignore".
"""
from __future__ import annotations

from typing import Callable

from ..engine.verdict import replay_verdict
from ..msr.model import KernelMsr

VERDICTS = ("kernel", "deny", "ignore", "constant", "emulate", "forward", "gp-kernel")
DENY = "deny"
KERNEL_GP = "gp-kernel"

KernelOf = Callable[[int, bool], "KernelMsr | None"]


def verdict(cp, index: int, write: bool, kernel: KernelMsr = KernelMsr.HANDLED) -> str:
    """The verdict of CompiledPolicy `cp` for one access whose fate in KVM is `kernel`
    (kvmgate.engine.replay_verdict)."""
    return replay_verdict(cp, index, write, kernel)


def policy_decider(cp, kernel: KernelOf | None = None) -> Callable[[int, bool, bool], str]:
    """decide(index, write, exception) -> verdict, for kvmgate.trace.replay().

    Events without the exception flag were completed by KVM when recorded (KernelMsr.HANDLED);
    flagged ones were failed by KVM itself: `kernel` says whether as UNKNOWN or INVALID (see the
    module docstring)."""
    def decide(index: int, write: bool, exception: bool) -> str:
        if not exception:
            return replay_verdict(cp, index, write)
        k = kernel(index, write) if kernel is not None else None
        if k is not None:
            return replay_verdict(cp, index, write, k)
        labels = {replay_verdict(cp, index, write, KernelMsr.INVALID),
                  replay_verdict(cp, index, write, KernelMsr.UNKNOWN)}
        return "|".join(sorted(labels))
    return decide


__all__ = ["policy_decider", "verdict", "VERDICTS", "DENY", "KERNEL_GP"]
