"""The policy's parts as data: rules over MSR index ranges, per direction, with an action, and
the user-space actions they compile to.  Pure data: no parsing, no compiling, no KVM."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from ..msr.model import READ, WRITE

M64 = (1 << 64) - 1


class RuleAction(enum.StrEnum):
    """A [[rule]]'s `action` (the text is what the policy file and messages say)."""
    ALLOW = "allow"          # the kernel handles it (with log = true: forwarded from user space)
    DENY = "deny"            # #GP
    IGNORE = "ignore"        # reads 0, writes dropped
    CONSTANT = "constant"    # reads return `value`; writes ignored or #GP
    EMULATE = "emulate"      # a register kept in user space


class ActionKind(enum.StrEnum):
    """What user space does with an access that exits (the audit record's `action` text)."""
    DENY = "deny"
    IGNORE = "ignore"
    CONSTANT = "constant"
    EMULATE = "emulate"
    FORWARD = "forward"      # allow + log: carried out host-initiated so it can be recorded


class FailureAction(enum.StrEnum):
    """What [unknown] / [invalid] may do."""
    GP = "gp"
    IGNORE = "ignore"


ACTIONS = tuple(a.value for a in RuleAction)
FAILURE_ACTIONS = tuple(a.value for a in FailureAction)
ACCESS_WORDS = {"read": READ, "write": WRITE, "both": READ | WRITE, "rw": READ | WRITE}


@dataclass(frozen=True)
class Rule:
    """One [[rule]]: MSR indices [lo, hi] inclusive, an access mask, an action and its options."""
    lo: int
    hi: int
    access: int
    action: RuleAction
    log: bool
    where: str                      # "FILE:LINE (rule N)" for messages
    value: int = 0                  # constant: the value reads return
    writes: str = "ignore"          # constant: "ignore" (drop) or "gp"
    initial: int = 0                # emulate: initial register value
    write_mask: int = M64           # emulate: bits the guest may change
    allowed: tuple[int, ...] | None = None  # emulate: the only values the guest may write
    label: str = ""                 # how the rule named its MSRs

    def __post_init__(self):
        object.__setattr__(self, "action", RuleAction(self.action))   # "allow" works too

    def params(self) -> tuple:
        """What must agree for two rules over the same MSR not to contradict each other."""
        return (self.action, self.log, self.value, self.writes, self.initial, self.write_mask,
                self.allowed)

    @property
    def kernel_handles(self) -> bool:
        """An allow without logging: the kernel completes the access, user space never sees it."""
        return self.action is RuleAction.ALLOW and not self.log


@dataclass(frozen=True)
class FailureRule:
    """[unknown] or [invalid]: what happens to accesses KVM itself fails (UNKNOWN / INVAL)."""
    action: FailureAction = FailureAction.GP
    log: bool = False

    def __post_init__(self):
        object.__setattr__(self, "action", FailureAction(self.action))


@dataclass(frozen=True)
class Action:
    """What user space does with an access that exits: one per (MSR, direction) or default."""
    kind: ActionKind
    log: bool
    rule: str                 # where it came from, for the audit log and explain
    value: int = 0
    writes: str = "ignore"
    initial: int = 0
    write_mask: int = M64
    allowed: tuple[int, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "kind", ActionKind(self.kind))

    @classmethod
    def of_rule(cls, rule: Rule) -> "Action":
        kind = ActionKind.FORWARD if rule.action is RuleAction.ALLOW else ActionKind(rule.action.value)
        return cls(kind, rule.log, rule.where, rule.value, rule.writes, rule.initial,
                   rule.write_mask, rule.allowed)

    @classmethod
    def of_failure(cls, rule: FailureRule, what: str) -> "Action | None":
        """[unknown]/[invalid] as an action; None (a #GP with no record) for gp without log."""
        if rule.action is FailureAction.GP and not rule.log:
            return None
        kind = ActionKind.DENY if rule.action is FailureAction.GP else ActionKind.IGNORE
        return cls(kind, rule.log, f"[{what}]")
