"""The policy as data: rules over MSR index ranges, per direction, with an action."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..msr.model import READ, WRITE
from ..uapi import U64

ACTIONS = ("allow", "deny", "ignore", "constant", "emulate")
FAILURE_ACTIONS = ("gp", "ignore")          # what [unknown] / [invalid] may do
ACCESS_WORDS = {"read": READ, "write": WRITE, "both": READ | WRITE, "rw": READ | WRITE}


@dataclass(frozen=True)
class Rule:
    """One [[rule]]: MSR indices [lo, hi] inclusive, an access mask, an action and its options."""
    lo: int
    hi: int
    access: int
    action: str
    log: bool
    where: str                      # "FILE:LINE (rule N)" for messages
    value: int = 0                  # constant: the value reads return
    writes: str = "ignore"          # constant: "ignore" (drop) or "gp"
    initial: int = 0                # emulate: initial register value
    write_mask: int = U64           # emulate: bits the guest may change
    allowed: tuple[int, ...] | None = None  # emulate: the only values the guest may write
    label: str = ""                 # how the rule named its MSRs

    def params(self) -> tuple:
        """What must agree for two rules over the same MSR not to contradict each other."""
        return (self.action, self.log, self.value, self.writes, self.initial, self.write_mask,
                self.allowed)


@dataclass(frozen=True)
class FailureRule:
    """[unknown] or [invalid]: what happens to accesses KVM itself fails (UNKNOWN / INVAL)."""
    action: str = "gp"
    log: bool = False


@dataclass
class Policy:
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
    audit_failure: str = "stop"     # a failed audit write: stop the guest | warn and go on
    source: str = "<policy>"

    def bind(self, machine, audit=None, carry=None):
        """Compile (against this host's kvm.ignore_msrs) and bind: see CompiledPolicy.bind."""
        from ..hostinfo import ignore_msrs
        from .compile import compile_policy
        return compile_policy(self, ignore_msrs()).bind(machine, audit, carry)
