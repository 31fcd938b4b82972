"""Compile a Policy into what KVM and the exit path need: an MsrFilter that fits the kernel's
limits (16 ranges of at most 0x3000 MSRs), a user-space exit mask, and a handler table.

Compilation works on intervals (policy.plan): its cost grows with the number of rules, not with
the number of MSRs a range covers.  Verdicts come from msr.model (the kernel's rules)."""
from __future__ import annotations

import heapq
import warnings
from collections import Counter
from dataclasses import dataclass, field

from ..errors import PolicyError
from ..hostinfo import ignore_msrs
from ..msr import names
from ..msr.model import (DEFAULT_ALLOW, DEFAULT_DENY, EXIT_REASON_FILTER, EXIT_REASON_INVAL,
                         EXIT_REASON_UNKNOWN, MAX_NMSRS, MAX_RANGES, READ, U32, WRITE,
                         X2APIC_FIRST, X2APIC_LAST, Fate, KernelMsr, MsrFilter, MsrRange, outcome)
from .handlers import Registers, make_handler
from .model import Action, ActionKind, FailureRule, Rule
from .plan import ActionTable, Interval, merge, plan_ranges


class PolicyWarning(UserWarning):
    """A rule the kernel cannot enforce, kept because the policy asked for warnings."""


@dataclass
class Policy:
    """A parsed policy file: the default for MSRs listed nowhere, the rules, [unknown] and
    [invalid], and the [policy] settings."""
    name: str
    default: str                    # "allow" or "deny" for MSRs listed nowhere
    default_log: bool
    rules: list[Rule]
    unknown: FailureRule = field(default_factory=FailureRule)
    invalid: FailureRule = field(default_factory=FailureRule)
    x2apic: str = "error"           # rules the kernel cannot enforce on x2APIC MSRs: error|warn
    host_ignore_msrs: str = "error"  # reliance on UNKNOWN exits under kvm.ignore_msrs=Y: error|warn
    audit_rate: float = 20.0        # audit records per second per MSR and direction
    audit_burst: int = 20
    source: str = "<policy>"

    def bind(self, machine, audit=None):
        """Compile (against this host's kvm.ignore_msrs) and bind: see CompiledPolicy.bind."""
        return compile_policy(self, ignore_msrs()).bind(machine, audit)


@dataclass
class CompiledPolicy:
    policy: Policy
    filter: MsrFilter
    exit_mask: int
    actions: ActionTable                # key: index << 1 | is_write
    default_action: Action | None       # FILTER exits of MSRs listed nowhere (default deny)
    unknown: Action | None              # UNKNOWN exits
    invalid: Action | None              # INVAL exits
    warnings: list[str] = field(default_factory=list)

    def bind(self, machine, audit=None):
        """What Machine.set_policy installs: (filter, exit mask, handler, self).  Emulated
        registers live in machine.state, so they carry over policy swaps."""
        regs = machine.state.setdefault("policy.registers", Registers())
        return self.filter, self.exit_mask, make_handler(self, machine, audit, regs), self

    def action_for(self, index: int, write: bool, reason: int) -> Action | None:
        """The user-space action for an exit; None means #GP without a record."""
        if reason == EXIT_REASON_FILTER:
            return self.actions.get(index << 1 | write, self.default_action)
        if reason == EXIT_REASON_UNKNOWN:
            return self.unknown
        if reason == EXIT_REASON_INVAL:
            return self.invalid
        return None

    def explain(self, index: int, access: int, kernel: KernelMsr = KernelMsr.HANDLED) -> dict:
        """Where one access goes: the filter's verdict, the kernel outcome, the handler."""
        flt = self.filter
        o = outcome(flt, index, access, self.exit_mask, kernel)
        act = self.action_for(index, access == WRITE, o.reason) if o.fate is Fate.EXIT else None
        rng = flt.deciding_range(index, access)
        if X2APIC_FIRST <= index <= X2APIC_LAST:
            verdict = "allow (x2APIC: never filtered)"
        else:
            verdict = ("allow" if flt.allows(index, access) else "deny") + (
                f" (range {rng})" if rng is not None else " (default)")
        if o.fate is Fate.KERNEL:
            handler = "kernel"
        elif o.fate is Fate.EXIT:
            handler = f"user space: {act.kind if act else 'gp'}"
        else:
            handler = o.fate.value
        return {"msr": f"{index:#x}", "name": names.msr_name(index) or "",
                "access": "write" if access == WRITE else "read", "filter": verdict,
                "outcome": str(o), "handled_by": handler,
                "logged": bool(act and act.log), "rule": act.rule if act else ""}


Segment = tuple[int, int, Rule]     # [lo, hi] decided by one rule


def _sweep(rules: list[tuple[int, Rule]]) -> tuple[list[Segment], tuple | None]:
    """One direction: the disjoint segments and the rule deciding each (the last rule listed,
    as rules agree where they overlap), and the first contradiction as (k, index, j): rule
    order k is the first that disagrees with an earlier one, j, at MSR `index`."""
    events = []
    for order, r in rules:
        events.append((r.lo, 1, order))
        events.append((r.hi + 1, 0, order))
    events.sort()
    by_order = dict(rules)
    params = {order: r.params() for order, r in rules}
    active: set[int] = set()
    heap: list[int] = []
    kinds: Counter = Counter()
    segs: list[list] = []
    first: tuple | None = None
    i = 0
    while i < len(events):
        pos = events[i][0]
        while i < len(events) and events[i][0] == pos:
            _, add, order = events[i]
            if add:
                active.add(order)
                heapq.heappush(heap, -order)
                kinds[params[order]] += 1
            else:
                active.discard(order)
                kinds[params[order]] -= 1
                if not kinds[params[order]]:
                    del kinds[params[order]]
            i += 1
        if not active or pos > U32:
            continue
        end = events[i][0] - 1 if i < len(events) else U32
        while -heap[0] not in active:
            heapq.heappop(heap)
        win = -heap[0]
        if segs and segs[-1][1] == pos - 1 and segs[-1][2] == win:
            segs[-1][1] = end
        else:
            segs.append([pos, end, win])
        if len(kinds) > 1:
            orders = sorted(active)
            p0 = params[orders[0]]
            k = next(n for n, o in enumerate(orders) if params[o] != p0)
            cand = (orders[k], pos, orders[k - 1])
            if first is None or cand[:2] < first[:2]:
                first = cand
    return [(lo, hi, by_order[o]) for lo, hi, o in segs], first


def _resolve(policy: Policy) -> dict[int, list[Segment]]:
    """Per direction, the segments of MSRs some rule decides; contradicting overlaps are errors
    naming both rules (the first rule, in file order, that contradicts an earlier one)."""
    out, worst = {}, None
    for access in (READ, WRITE):
        segs, first = _sweep([(n, r) for n, r in enumerate(policy.rules) if r.access & access])
        out[access] = segs
        if first is not None:
            cand = (first[0], first[1], access, first[2])
            if worst is None or cand < worst:
                worst = cand
    if worst is not None:
        k, index, access, j = worst
        rule, old = policy.rules[k], policy.rules[j]
        raise PolicyError(
            f"contradicts {old.where} for {'writes' if access == WRITE else 'reads'} of "
            f"{names.describe(index)} ({old.action} vs {rule.action}); "
            "remove one or split the ranges", rule.where)
    return out


def _outside_x2apic(lo: int, hi: int) -> list[Interval]:
    return [(a, b) for a, b in ((lo, min(hi, X2APIC_FIRST - 1)), (max(lo, X2APIC_LAST + 1), hi)) if a <= b]


def compile_policy(policy: Policy, host_ignore_msrs: bool | None = False) -> CompiledPolicy:
    """Policy -> filter + exit mask + handler table, or PolicyError saying what cannot work."""
    notes: list[str] = []
    default_allow = policy.default == "allow"
    exceptions: dict[int, list[Interval]] = {READ: [], WRITE: []}
    actions = ActionTable()
    x2apic_bad = []
    for access, segs in _resolve(policy).items():
        for lo, hi, rule in segs:
            kernel_handles = rule.kernel_handles
            if lo <= X2APIC_LAST and hi >= X2APIC_FIRST and not kernel_handles:
                x2apic_bad.append((max(lo, X2APIC_FIRST), min(hi, X2APIC_LAST), access, rule))
            parts = _outside_x2apic(lo, hi)
            if kernel_handles != default_allow:
                exceptions[access].extend(parts)
            if not kernel_handles:
                act = Action.of_rule(rule)
                for a, b in parts:
                    actions.add(a, b, access == WRITE, act)
    said = set()
    for lo, hi, access, rule in sorted(x2apic_bad, key=lambda t: (t[0], t[2])):
        if (lo, hi, rule.where) in said:         # the same rule over both directions: once
            continue
        said.add((lo, hi, rule.where))
        what = names.describe(lo) if lo == hi else f"{lo:#x}..{hi:#x}"
        msg = (f"{what} {'is an x2APIC MSR' if lo == hi else 'are x2APIC MSRs'} (0x800-0x8ff): KVM "
               f"never filters those, so action {rule.action.value!r}{' with log' if rule.log else ''} "
               "cannot be enforced; drop the rule or set [policy] x2apic = \"warn\"")
        if policy.x2apic == "error":
            raise PolicyError(msg, rule.where)
        notes.append(f"{rule.where}: {msg}")
    exceptions = {a: merge(ivs) for a, ivs in exceptions.items()}
    ranges, needed, exact = plan_ranges(exceptions, default_allow, MAX_RANGES)
    if needed > MAX_RANGES:
        raise PolicyError(
            f"needs {'' if exact else 'at least '}{needed} filter ranges, the kernel takes {MAX_RANGES} "
            f"(each at most {MAX_NMSRS:#x} MSRs wide): the listed MSRs are spread too far apart; "
            f"flip the default (now {policy.default!r}) or list fewer distant MSRs", policy.source)
    if not default_allow and not ranges:
        # DEFAULT_DENY needs a non-empty range: one that denies an MSR nobody lists
        ranges = [MsrRange(READ, 0, 1, b"\x00")]
    default_action = None if default_allow else Action(ActionKind.DENY, policy.default_log, "[policy] default")
    unknown = Action.of_failure(policy.unknown, "unknown")
    invalid = Action.of_failure(policy.invalid, "invalid")
    mask = (EXIT_REASON_FILTER if actions or default_action and default_action.log else 0) | \
           (EXIT_REASON_UNKNOWN if unknown else 0) | (EXIT_REASON_INVAL if invalid else 0)
    if unknown and host_ignore_msrs:
        msg = ("the host has kvm.ignore_msrs=Y: KVM swallows unknown MSRs itself (reads 0, writes "
               "dropped), so [unknown] never sees them; set it to N on the host or [policy] "
               "host_ignore_msrs = \"warn\"")
        if policy.host_ignore_msrs == "error":
            raise PolicyError(msg, f"{policy.source} [unknown]")
        notes.append(msg)
    flt = MsrFilter(ranges, DEFAULT_ALLOW if default_allow else DEFAULT_DENY)
    flt.validate()
    for n in notes:
        warnings.warn(n, PolicyWarning, stacklevel=2)
    return CompiledPolicy(policy, flt, mask, actions, default_action, unknown, invalid, notes)
