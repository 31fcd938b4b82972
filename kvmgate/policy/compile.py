"""Compile a Policy into what KVM and the exit path need: an MsrFilter that fits the kernel's
limits (16 ranges of at most 0x3000 MSRs), a user-space exit mask, and a handler table."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from ..errors import PolicyError
from ..msr import names
from ..msr.model import (DEFAULT_ALLOW, DEFAULT_DENY, EXIT_REASON_FILTER, EXIT_REASON_INVAL,
                         EXIT_REASON_UNKNOWN, MAX_NMSRS, MAX_RANGES, READ, WRITE, X2APIC_FIRST,
                         X2APIC_LAST, KernelMsr, MsrFilter, MsrRange, outcome, windows)
from ..uapi import U64
from ..vm import PolicyBinding
from .model import FailureRule, Policy, Rule



class PolicyWarning(UserWarning):
    """A rule the kernel cannot enforce, kept because the policy asked for warnings."""


@dataclass(frozen=True)
class Action:
    """What user space does with an access that exits: one per (MSR, direction) or default."""
    kind: str                 # deny | ignore | constant | emulate | forward (allow + log)
    log: bool
    rule: str                 # where it came from, for the audit log and explain
    value: int = 0
    writes: str = "ignore"
    initial: int = 0
    write_mask: int = U64
    allowed: tuple[int, ...] | None = None


@dataclass
class CompiledPolicy:
    policy: Policy
    filter: MsrFilter
    exit_mask: int
    actions: dict[int, Action]          # key: index << 1 | is_write
    default_action: Action | None       # FILTER exits of MSRs listed nowhere (default deny)
    unknown: Action | None              # UNKNOWN exits
    invalid: Action | None              # INVAL exits
    warnings: list[str] = field(default_factory=list)

    def bind(self, machine, audit=None, carry=None):
        """What Machine.set_policy installs (vm.PolicyBinding).  `carry` is the emulated
        registers of the policy installed before (so they carry over policy swaps)."""
        from .handlers import Registers, make_handler
        regs = carry if isinstance(carry, Registers) else Registers()
        return PolicyBinding(self.filter, self.exit_mask, make_handler(self, audit, regs), self, regs)

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
        act = self.action_for(index, access == WRITE, o.reason) if o.fate.value == "exit" else None
        rng = flt.deciding_range(index, access)
        if X2APIC_FIRST <= index <= X2APIC_LAST:
            verdict = "allow (x2APIC: never filtered)"
        else:
            verdict = ("allow" if flt.allows(index, access) else "deny") + (
                f" (range {rng})" if rng is not None else " (default)")
        if o.fate.value == "kernel":
            handler = "kernel"
        elif o.fate.value == "exit":
            handler = f"user space: {act.kind if act else 'gp'}"
        else:
            handler = o.fate.value
        return {"msr": f"{index:#x}", "name": names.msr_name(index) or "",
                "access": "write" if access == WRITE else "read", "filter": verdict,
                "outcome": str(o), "handled_by": handler,
                "logged": bool(act and act.log), "rule": act.rule if act else ""}


def _resolve(policy: Policy) -> dict[tuple[int, int], Rule]:
    """(index, access) -> the rule for it; contradicting overlaps are errors."""
    table: dict[tuple[int, int], Rule] = {}
    for rule in policy.rules:
        if rule.hi - rule.lo >= 1 << 20:
            raise PolicyError(f"range {rule.lo:#x}..{rule.hi:#x} covers {rule.hi - rule.lo + 1} MSRs; "
                              f"the kernel filter holds at most {MAX_RANGES * MAX_NMSRS:#x}: "
                              "narrow it or change the default instead", rule.where)
        for index in range(rule.lo, rule.hi + 1):
            for access in (READ, WRITE):
                if not rule.access & access:
                    continue
                old = table.get((index, access))
                if old is not None and old.params() != rule.params():
                    raise PolicyError(
                        f"contradicts {old.where} for {'writes' if access == WRITE else 'reads'} of "
                        f"{names.describe(index)} ({old.action} vs {rule.action}); "
                        "remove one or split the ranges", rule.where)
                table[(index, access)] = rule
    return table


def _action(rule: Rule) -> Action:
    kind = "forward" if rule.action == "allow" else rule.action
    return Action(kind, rule.log, rule.where, rule.value, rule.writes, rule.initial,
                  rule.write_mask, rule.allowed)


def _failure(rule: FailureRule, what: str) -> Action | None:
    if rule.action == "gp" and not rule.log:
        return None
    return Action("deny" if rule.action == "gp" else "ignore", rule.log, f"[{what}]")


def plan_ranges(exceptions: dict[int, set[int]], default_allow: bool) -> list[MsrRange]:
    """Ranges whose bitmaps flip the default for the given MSRs.

    `exceptions[READ]` / `[WRITE]`: MSRs whose verdict differs from the default.  One range per
    window when reads and writes agree there, else a READ and a WRITE range."""
    reads, writes = exceptions[READ], exceptions[WRITE]

    def rng(flags: int, lo: int, hi: int, flip: set[int]) -> MsrRange:
        return MsrRange.from_bits(flags, lo, [(i in flip) != default_allow for i in range(lo, hi + 1)])

    shared = []
    for lo, hi in windows(sorted(reads | writes)):
        r = {i for i in reads if lo <= i <= hi}
        w = {i for i in writes if lo <= i <= hi}
        if r == w:
            shared.append(rng(READ | WRITE, lo, hi, r))
        else:
            if r:
                shared.append(rng(READ, min(r), max(r), r))
            if w:
                shared.append(rng(WRITE, min(w), max(w), w))
    separate = [rng(READ, lo, hi, reads) for lo, hi in windows(sorted(reads))] + \
               [rng(WRITE, lo, hi, writes) for lo, hi in windows(sorted(writes))]
    return shared if len(shared) <= len(separate) else separate


def compile_policy(policy: Policy, host_ignore_msrs: bool | None = False) -> CompiledPolicy:
    """Policy -> filter + exit mask + handler table, or PolicyError saying what cannot work."""
    notes: list[str] = []
    table = _resolve(policy)
    default_allow = policy.default == "allow"
    exceptions: dict[int, set[int]] = {READ: set(), WRITE: set()}
    actions: dict[int, Action] = {}
    for (index, access), rule in table.items():
        kernel_handles = rule.action == "allow" and not rule.log
        if X2APIC_FIRST <= index <= X2APIC_LAST:
            if not kernel_handles:
                msg = (f"{names.describe(index)} is an x2APIC MSR (0x800-0x8ff): KVM never filters "
                       f"those, so action {rule.action!r}{' with log' if rule.log else ''} cannot be "
                       "enforced; drop the rule or set [policy] x2apic = \"warn\"")
                if policy.x2apic == "error":
                    raise PolicyError(msg, rule.where)
                notes.append(f"{rule.where}: {msg}")
            continue
        if kernel_handles != default_allow:
            exceptions[access].add(index)
        if not kernel_handles:
            actions[index << 1 | (access == WRITE)] = _action(rule)
    ranges = plan_ranges(exceptions, default_allow)
    if len(ranges) > MAX_RANGES:
        raise PolicyError(
            f"needs {len(ranges)} filter ranges, the kernel takes {MAX_RANGES} (each at most "
            f"{MAX_NMSRS:#x} MSRs wide): the listed MSRs are spread too far apart; "
            f"flip the default (now {policy.default!r}) or list fewer distant MSRs", policy.source)
    if not default_allow and not ranges:
        # DEFAULT_DENY needs a non-empty range: one that denies an MSR nobody lists
        ranges = [MsrRange(READ, 0, 1, b"\x00")]
    default_action = None if default_allow else Action("deny", policy.default_log, "[policy] default")
    unknown = _failure(policy.unknown, "unknown")
    invalid = _failure(policy.invalid, "invalid")
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
