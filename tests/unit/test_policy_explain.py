"""`CompiledPolicy.explain`: where one access goes, against expectations read off the policy
(docs/kvm-msr.md §3 for the filter, §4 for exits; the README for the actions).  Under a
deny default only the MSRs the kernel handles need a range; the others are the default's."""
import pytest

from kvmgate.msr.model import READ, WRITE, KernelMsr
from kvmgate.policy import compile_policy, parse_policy

POLICY = """[policy]
default = 'deny'
[[rule]]
msrs = [0x10, 0x1b]
action = 'allow'
[[rule]]
msr = 0x35
access = 'read'
action = 'constant'
value = 1
[[rule]]
msr = 0x186
action = 'ignore'
log = false
[unknown]
action = 'gp'
log = true
"""
H, U, I = KernelMsr.HANDLED, KernelMsr.UNKNOWN, KernelMsr.INVALID


@pytest.fixture(scope="module")
def cp():
    return compile_policy(parse_policy(POLICY, "p.toml"))


@pytest.mark.parametrize("index,access,kernel,want", [
    (0x10, READ, H, {"filter": "allow (range 0)", "outcome": "kernel", "handled_by": "kernel",
                     "logged": False, "rule": ""}),
    (0x10, READ, U, {"filter": "allow (range 0)", "outcome": "exit(UNKNOWN)",
                     "handled_by": "user space: deny", "logged": True, "rule": "[unknown]"}),
    (0x10, WRITE, I, {"filter": "allow (range 0)", "outcome": "#GP(INVAL)", "handled_by": "gp",
                      "logged": False, "rule": ""}),
    (0x35, READ, H, {"filter": "deny (default)", "outcome": "exit(FILTER)",
                     "handled_by": "user space: constant", "logged": True, "rule": "p.toml:6 (rule 2)"}),
    (0x35, WRITE, H, {"filter": "deny (default)", "outcome": "exit(FILTER)",
                      "handled_by": "user space: deny", "logged": True, "rule": "[policy] default"}),
    (0x186, WRITE, U, {"filter": "deny (default)", "outcome": "exit(FILTER)",  # FILTER wins
                       "handled_by": "user space: ignore", "logged": False, "rule": "p.toml:11 (rule 3)"}),
    (0x830, WRITE, H, {"filter": "allow (x2APIC: never filtered)", "outcome": "kernel",
                       "handled_by": "kernel", "logged": False, "rule": ""}),
    (0x800, READ, H, {"filter": "allow (x2APIC: never filtered)", "outcome": "kernel"}),
    (0x8FF, READ, H, {"filter": "allow (x2APIC: never filtered)", "outcome": "kernel"}),
    (0x7FF, READ, H, {"filter": "deny (default)", "outcome": "exit(FILTER)"}),   # just outside
    (0x900, READ, H, {"filter": "deny (default)", "outcome": "exit(FILTER)"}),
    (0x12345678, READ, H, {"filter": "deny (default)", "outcome": "exit(FILTER)",
                           "handled_by": "user space: deny", "logged": True, "rule": "[policy] default"}),
])
def test_explain_rows(cp, index, access, kernel, want):
    row = cp.explain(index, access, kernel)
    assert row["msr"] == f"{index:#x}" and row["access"] == ("write" if access == WRITE else "read")
    assert {k: row[k] for k in want} == want


def test_explain_names_the_msr(cp):
    assert cp.explain(0x10, READ)["name"] == "IA32_TSC"
    assert cp.explain(0x12345678, READ)["name"] == ""


def test_explain_without_exits_is_a_plain_gp():
    cp = compile_policy(parse_policy("[policy]\ndefault='deny'\nlog=false\n[[rule]]\nmsr=0x10\naction='allow'\n"))
    row = cp.explain(0x11, WRITE)
    assert (row["filter"], row["outcome"], row["handled_by"], row["logged"], row["rule"]) == \
        ("deny (default)", "#GP(FILTER)", "gp", False, "")       # the kernel's #GP: no rule runs
    assert cp.explain(0x10, WRITE)["filter"] == "allow (range 0)"    # only 0x10 needs a range


def test_action_for_reasons(cp):
    assert cp.action_for(0x35, False, 4).kind == "constant"
    assert cp.action_for(0x35, True, 4).kind == "deny"          # the default
    assert cp.action_for(0x35, False, 2).rule == "[unknown]"
    assert cp.action_for(0x35, False, 1) is None                # [invalid] gp: no record
    assert cp.action_for(0x35, False, 8) is None
