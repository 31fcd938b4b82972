"""Policy files: every kind of bad input is a PolicyError naming file, line and field."""
import pytest

from kvmgate.errors import PolicyError
from kvmgate.msr.model import DEFAULT_DENY, READ, WRITE
from kvmgate.policy import compile_policy, parse_policy

GOOD = """
[policy]
default = "deny"

[[rule]]
msr = "IA32_TSC"
action = "allow"

[[rule]]
range = [0x186, 0x189]
access = "write"
action = "ignore"
"""


def bad(text, match, where=None):
    with pytest.raises(PolicyError, match=match) as ei:
        compile_policy(parse_policy(text, "p.toml"))
    if where:
        assert ei.value.where.startswith(where), ei.value.where
    return ei.value


def test_good_policy_compiles():
    cp = compile_policy(parse_policy(GOOD, "p.toml"))
    assert cp.filter.flags == DEFAULT_DENY
    assert cp.filter.allows(0x10, READ) and not cp.filter.allows(0x11, READ)
    assert cp.actions[0x186 << 1 | 1].kind == "ignore"


@pytest.mark.parametrize("text,match,where", [
    ("[policy\ndefault='deny'", "not valid TOML", "p.toml:1"),
    ("[policy]\ndefault = 'maybe'", "'maybe' is not one of allow, deny", "p.toml:2: policy.default"),
    ("[polcy]\n", "unknown table or key 'polcy'", "p.toml:1"),
    ("[[rule]]\nmsr = 'LSATR'\naction = 'deny'", "did you mean LSTAR", "p.toml:2: rule 1.msr"),
    ("[[rule]]\nmsr = 0x100000000\naction = 'deny'", "outside 0..0xffffffff", "p.toml:2: rule 1.msr"),
    ("[[rule]]\nmsr = 0x10\naction = 'allow'\n\n[[rule]]\nmsr = 0x10\naction = 'bogus'",
     "'bogus' is not one of", "p.toml:7: rule 2.action"),
    ("[[rule]]\nmsr = 0x10\n", "missing", "p.toml:1: rule 1.action"),
    ("[[rule]]\nmsr = 0x10\nmsrs = [0x11]\naction = 'deny'", "exactly one of", "p.toml:1"),
    ("[[rule]]\nmsr = 0x10\naction = 'constant'", "needs value", "p.toml:1: rule 1.value"),
    ("[[rule]]\nmsr = 0x10\naction = 'constant'\nvalue = -1", "outside", "p.toml:4: rule 1.value"),
    ("[[rule]]\nmsr = 0x10\naction = 'deny'\nvalue = 1", "no meaning for action 'deny'", "p.toml:4"),
    ("[[rule]]\nmsr = 0x10\naction = 'deny'\naccess = 'exec'", "not one of read, write, both", "p.toml:4"),
    ("[[rule]]\nrange = [0x20, 0x10]\naction = 'deny'", "above LAST", "p.toml:2"),
    ("[[rule]]\nmsr = 0x10\naction = 'deny'\nlog = 'yes'", "not true or false", "p.toml:4: rule 1.log"),
    ("[[rule]]\nmsr = 0x10\naction = 'deny'\ncolour = 1", "unknown key 'colour'", "p.toml:4"),
    ("[unknown]\naction = 'explode'", "not one of gp, ignore", "p.toml:2: unknown.action"),
])
def test_bad_input_is_located(text, match, where):
    bad(text, match, where)


def test_contradicting_overlap_names_both_rules():
    e = bad("[[rule]]\nrange = [0x10, 0x20]\naction = 'allow'\n\n[[rule]]\nmsr = 0x18\naction = 'deny'",
            "contradicts p.toml:1 \\(rule 1\\)", "p.toml:5 (rule 2)")
    assert "0x18" in str(e) or "IA32" in str(e)


def test_identical_overlap_is_fine():
    compile_policy(parse_policy("[[rule]]\nrange=[0x10,0x20]\naction='deny'\n[[rule]]\nmsr=0x18\naction='deny'"))


def test_x2apic_rule_refused_or_warned():
    bad("[[rule]]\nmsr = 0x830\naction = 'deny'", "x2APIC", "p.toml:1")
    with pytest.warns(UserWarning, match="x2APIC"):
        cp = compile_policy(parse_policy("[policy]\nx2apic='warn'\n[[rule]]\nmsr=0x830\naction='deny'", "p.toml"))
    assert cp.filter.allows(0x830, WRITE)
    compile_policy(parse_policy("[[rule]]\nmsr = 0x830\naction = 'allow'"))   # allowing is a no-op


def test_too_many_ranges_is_explained():
    rules = "\n".join(f"[[rule]]\nmsr = {i * 0x10000:#x}\naction = 'deny'\n" for i in range(17))
    bad("[policy]\ndefault = 'allow'\n" + rules, "needs 17 filter ranges, the kernel takes 16")


def test_unknown_exits_refused_on_ignore_msrs_host():
    p = parse_policy("[unknown]\naction = 'ignore'", "p.toml")
    with pytest.raises(PolicyError, match="ignore_msrs=Y"):
        compile_policy(p, host_ignore_msrs=True)
    compile_policy(p, host_ignore_msrs=False)


def test_rule_over_every_msr_compiles_or_is_refused_for_what_it_means():
    # covers the x2APIC MSRs, which KVM never filters: refused for that, not for its size
    bad("[[rule]]\nrange = [0, 0xffffffff]\naction = 'deny'", "x2APIC MSRs", "p.toml:1 (rule 1)")
    with pytest.warns(UserWarning, match="x2APIC"):
        cp = compile_policy(parse_policy("[policy]\nx2apic = 'warn'\n[[rule]]\nrange = [0, 0xffffffff]\n"
                                         "action = 'ignore'", "p.toml"))
    assert cp.filter.flags == DEFAULT_DENY and not cp.filter.allows(0xFFFFFFFF, WRITE)
    assert cp.action_for(0xFFFFFFFF, True, 4).kind == "ignore"
    assert cp.action_for(0, False, 4).kind == "ignore"
    assert cp.action_for(0x800, False, 4).kind == "deny"       # the default: x2APIC never exits
    # the same denial under a default allow would need a filter range per 0x3000 MSRs
    bad("[policy]\ndefault = 'allow'\nx2apic = 'warn'\n[[rule]]\nrange = [0, 0xffffffff]\naction = 'deny'",
        "needs at least 349526 filter ranges, the kernel takes 16")


def test_range_planning_splits_directions_and_windows():
    cp = compile_policy(parse_policy(
        "[policy]\ndefault='allow'\n[[rule]]\nmsr=0x10\naccess='read'\naction='deny'\n"
        "[[rule]]\nmsr=0x4000\naction='deny'\n"))
    assert not cp.filter.allows(0x10, READ) and cp.filter.allows(0x10, WRITE)
    assert not cp.filter.allows(0x4000, READ) and not cp.filter.allows(0x4000, WRITE)
    assert cp.filter.allows(0x11, READ) and cp.filter.allows(0x3FFF, WRITE)
    assert len(cp.filter.ranges) <= 3
