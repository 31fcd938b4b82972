"""What a wrapped VMM run returns (WrapResult) and how it is printed: the run-end counters for
people (`report`) and the --json document (`as_json`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..report import table


@dataclass
class WrapResult:
    returncode: int
    active: bool                          # the policy was installed in a VM
    failures: list[str]                   # what the shim refused (fail closed), in order
    summary: list[dict]                   # AuditLog.summary(): decisions per MSR
    exits: dict                           # shim counters summed over vCPUs
    audit: dict                           # written / suppressed / ring drops
    reloads: dict = field(default_factory=dict)


def report(r: WrapResult, out) -> None:
    """The run-end counters for people (as `kvmgate run` prints its decisions)."""
    e = r.exits
    code = "" if r.returncode is None else f" with code {r.returncode}"
    print(f"kvmgate: VMM exited{code}: MSR exits {e['policy']} answered by the policy, "
          f"{e['vmm']} by the VMM, {e['gp']} #GP (nobody asked), {e['host']} carried out as "
          f"KVM would; audit records {r.audit['written']} written, {r.audit['suppressed']} "
          f"suppressed, {r.audit['ring_dropped']} dropped (ring full)", file=out)
    if not r.active:
        why = f": {r.failures[0]}" if r.failures else ""
        print(f"kvmgate: the policy was never installed (no VM was created{why})", file=out)
    if r.summary:
        table(r.summary, out=out)
    out.flush()


def as_json(r: WrapResult) -> dict:
    return {"returncode": r.returncode, "policy_active": r.active, "failures": r.failures,
            "exits": r.exits, "audit": r.audit, "reloads": r.reloads, "decisions": r.summary}


__all__ = ["WrapResult", "report", "as_json"]
