"""The MSR exit handler driven by a CompiledPolicy: one dict lookup and one small function per
exit; audit records only for logged actions.  Safe to call from several vCPU threads."""
from __future__ import annotations

import threading

from ..errors import InjectGP
from ..msr.model import EXIT_REASON_FILTER, EXIT_REASON_INVAL, EXIT_REASON_UNKNOWN
from .model import M64, Action, ActionKind


class Registers:
    """User-space MSR registers of `emulate` actions (one lock: writes check-and-set)."""

    def __init__(self):
        self.values: dict[int, int] = {}
        self.lock = threading.Lock()


def perform(act: Action, exit, regs: Registers, machine) -> tuple[object, str]:
    """Carry out one action: (reply for the exit path, result text for the audit log)."""
    kind, write = act.kind, exit.is_write
    if kind is ActionKind.DENY:
        return InjectGP, "#GP"
    if kind is ActionKind.IGNORE:
        return (None, "dropped") if write else (0, "read 0x0")
    if kind is ActionKind.CONSTANT:
        if write:
            return (InjectGP, "#GP") if act.writes == "gp" else (None, "dropped")
        return act.value, f"read {act.value:#x}"
    if kind is ActionKind.EMULATE:
        with regs.lock:
            cur = regs.values.get(exit.index, act.initial)
            if not write:
                return cur, f"read {cur:#x}"
            new = exit.data
            if (new ^ cur) & ~act.write_mask & M64 or (act.allowed is not None and new not in act.allowed):
                return InjectGP, "#GP"
            regs.values[exit.index] = new
            return None, "written"
    if kind is ActionKind.FORWARD:    # allow + log: carried out host-initiated, so it can be recorded
        done = machine.vcpus[exit.vcpu].host_msr_access(exit.index, write, exit.data)
        if done is None:
            return InjectGP, "#GP"
        return (None, "written") if write else (done, f"read {done:#x}")
    return InjectGP, "#GP"


def make_handler(cp, machine, audit=None, regs: Registers | None = None):
    """on_msr handler for CompiledPolicy `cp`; `regs` carries emulated registers across policy
    swaps.  Per-MSR actions are one dict lookup unless the policy has wide ranges."""
    actions_get = cp.actions.get if cp.actions.has_spans else cp.actions.points.get
    default, unknown, invalid = cp.default_action, cp.unknown, cp.invalid
    regs = regs if regs is not None else Registers()
    record = audit.record if audit is not None else None
    count = audit.count if audit is not None else None

    def handler(exit):
        reason = exit.reason
        if reason == EXIT_REASON_FILTER:
            act = actions_get(exit.index << 1 | exit.is_write, default)
        elif reason == EXIT_REASON_UNKNOWN:
            act = unknown
        elif reason == EXIT_REASON_INVAL:
            act = invalid
        else:
            act = None
        if act is None:
            return InjectGP
        reply, result = perform(act, exit, regs, machine)
        if act.log and record is not None:
            try:
                rip = machine.vcpus[exit.vcpu].get_regs().rip
            except Exception:
                rip = None
            record(vcpu=exit.vcpu, rip=rip, index=exit.index, write=exit.is_write, value=exit.data,
                   reason=reason, action=act.kind, result=result, rule=act.rule)
        elif count is not None:
            count(exit.index, exit.is_write, act.kind, result)
        return reply

    handler.registers = regs
    return handler
