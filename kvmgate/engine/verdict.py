"""What a compiled policy does with one MSR exit, for `policy explain` and `trace replay`:
asked of the C engine (kg_decide without register state), so those commands restate nothing.

Without the C engine (kvmgate installed without a C compiler) the same question goes to the
Python exit path's own action code, kvmgate.policy.handlers.perform."""
from __future__ import annotations

import weakref
from typing import NamedTuple

from ..errors import InjectGP
from ..msr.model import EXIT_REASON_FILTER, READ, WRITE, Fate, KernelMsr, outcome
from ..policy.handlers import Registers, perform
from . import binding
from .binding import RES_DROPPED, RES_GP, RES_HOST, RES_VALUE, RES_WRITTEN
from .table import KIND_NAMES, build_table, mode_of

RESULTS = {RES_VALUE: "value", RES_WRITTEN: "written", RES_DROPPED: "dropped", RES_GP: "#GP",
           RES_HOST: "host"}


class Verdict(NamedTuple):
    action: str | None      # deny | ignore | constant | emulate | forward; None: no action (#GP)
    result: str             # value (a read answered) | written | dropped | #GP | host
    value: int              # result "value": what the read returns (emulate: the initial value)
    rule: str               # the deciding rule's description, "" for none
    log: bool               # the decision makes an audit record
    would_deny: bool        # audit mode: the policy would #GP; the access is carried out
    value_dependent: bool   # the outcome depends on the written value (emulate writes)

    @property
    def label(self) -> str:
        """One word for replay and explain: "deny" when the policy #GPs the access whatever
        the value (no action, deny, constant with writes = "gp"; in audit mode: would), else
        the action (an emulate write: its value decides, in either mode)."""
        if self.action is None or \
                ((self.result == "#GP" or self.would_deny) and not self.value_dependent):
            return "deny"
        return self.action


_tables: dict[int, tuple] = {}      # id(cp) -> (weakref to cp, mode, C engine, EngineTable)


def _c_engine(cp, mode: str):
    hit = _tables.get(id(cp))
    if hit is not None and hit[0]() is cp and hit[1] == mode:
        return hit[2], hit[3]
    table = build_table(cp, mode)
    eng = binding.native().Engine(table.data)
    key = id(cp)
    _tables[key] = (weakref.ref(cp, lambda _r: _tables.pop(key, None)), mode, eng, table)
    return eng, table


class _Exit:
    __slots__ = ("index", "is_write", "data", "reason", "vcpu")

    def __init__(self, index, is_write, data, reason):
        self.index, self.is_write, self.data, self.reason, self.vcpu = index, is_write, data, reason, 0


def python_verdict(cp, index: int, is_write: bool, reason: int, data: int) -> Verdict:
    act = cp.action_for(index, is_write, reason)
    if act is None:
        return Verdict(None, "#GP", 0, "", False, False, False)
    dep = act.kind == "emulate" and is_write
    if act.kind == "forward":
        return Verdict("forward", "host", 0, act.rule, act.log, False, False)
    reply, text = perform(act, _Exit(index, is_write, data, reason), Registers())
    if reply is InjectGP:
        return Verdict(act.kind, "#GP", 0, act.rule, act.log, False, dep)
    if reply is None:
        return Verdict(act.kind, "dropped" if text == "dropped" else "written", 0, act.rule,
                       act.log, False, dep)
    return Verdict(act.kind, "value", reply, act.rule, act.log, False, dep)


def verdict(cp, index: int, is_write: bool, reason: int, data: int = 0,
            mode: str | None = None) -> Verdict:
    """The decision of CompiledPolicy `cp` for an MSR exit with KVM_MSR_EXIT_REASON_* `reason`
    (FILTER 4, UNKNOWN 2, INVAL 1), emulated registers at their initial values."""
    mode = mode_of(cp, mode)
    if not binding.available():
        if mode != "enforce":
            raise binding.EngineUnavailable(
                "audit-mode verdicts need the C engine: " + binding.unavailable_reason())
        return python_verdict(cp, index, is_write, reason, data)
    eng, table = _c_engine(cp, mode)
    res, value, action, rule, flags = eng.verdict(index, is_write, reason, data)
    return Verdict(KIND_NAMES.get(action), RESULTS[res], value, table.rule(rule),
                   bool(flags & binding.DF_LOG), bool(flags & binding.DF_WOULD_DENY),
                   bool(flags & binding.DF_VALUE_DEP))


def replay_verdict(cp, index: int, write: bool, kernel: KernelMsr = KernelMsr.HANDLED,
                   mode: str | None = None) -> str:
    """The trace-replay verdict (kvmgate.trace.policy.VERDICTS) of one access whose fate in KVM
    is `kernel`: the kernel's part from msr.model.outcome(), the policy's part from the engine.

    kernel      the filter lets it through and KVM completes it
    ignore      the policy answers reads 0 / drops writes
    deny        #GP by the policy (also: the filter denies it and nothing exits to user space)
    gp-kernel   KVM fails it itself, and the policy ([unknown]/[invalid]) does not answer it
    constant | emulate | forward   the policy's action answers it

    Replay predicts with kvm.ignore_msrs off (KVM's default).  `mode` (the policy's own when
    None) changes no label: audit mode's "would #GP" is "deny" as enforce mode's #GP is."""
    o = outcome(cp.filter, index, WRITE if write else READ, cp.exit_mask, kernel)
    if o.fate is Fate.KERNEL:
        return "kernel"
    if o.reason == EXIT_REASON_FILTER:
        return "deny" if o.fate is Fate.GP else verdict(cp, index, write, o.reason, mode=mode).label
    if o.fate is Fate.GP:
        return "gp-kernel"
    label = verdict(cp, index, write, o.reason, mode=mode).label
    return "gp-kernel" if label == "deny" else label
