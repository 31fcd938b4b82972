"""Replay verdicts against a hand-written table for kvmgate/examples/deny-by-default.toml.

The table is read off the policy file and the README's actions (not computed by kvmgate):
an access the filter lets through is "kernel" when KVM completed it, "gp-kernel" when KVM
failed it (the example's [unknown] and [invalid] both answer #GP); an access the filter denies
gets its rule's action ("deny" for the default)."""
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from kvmgate.msr.model import KernelMsr
from kvmgate.policy import compile_policy, load_policy, parse_policy
from kvmgate.trace.policy import policy_decider, verdict
from kvmgate.trace.replay import replay, report_counts
from kvmgate.trace import Trace

EXAMPLE = Path(__file__).resolve().parents[2] / "kvmgate" / "examples" / "deny-by-default.toml"
LSTAR, UNLISTED = 0xC0000082, 0x12345678

# (index, write) -> (verdict when KVM completed the access, verdict when KVM failed it)
TABLE = {
    (0x10, False): ("kernel", "gp-kernel"),         # IA32_TSC: allow
    (0x10, True): ("kernel", "gp-kernel"),
    (0x35, False): ("constant", "constant"),        # MSR_CORE_THREAD_COUNT read: constant
    (0x35, True): ("deny", "deny"),                 # its writes are listed nowhere
    (0x186, False): ("ignore", "ignore"),           # PERFEVTSEL0..3: ignore
    (0x189, True): ("ignore", "ignore"),
    (0x18A, True): ("deny", "deny"),                # one past the range
    (0x1A0, False): ("deny", "deny"),
    (LSTAR, False): ("kernel", "gp-kernel"),        # read allowed
    (LSTAR, True): ("emulate", "emulate"),          # write emulated
    (0x808, True): ("kernel", "gp-kernel"),         # x2APIC: never filtered
    (UNLISTED, False): ("deny", "deny"),
}


@pytest.fixture(scope="module")
def cp():
    return compile_policy(load_policy(EXAMPLE))


@pytest.mark.parametrize("key", sorted(TABLE))
def test_verdicts_of_the_example_policy(cp, key):
    index, write = key
    done, failed = TABLE[key]
    assert verdict(cp, index, write) == done
    assert verdict(cp, index, write, KernelMsr.UNKNOWN) == failed
    assert verdict(cp, index, write, KernelMsr.INVALID) == failed
    decide = policy_decider(cp)
    assert decide(index, write, False) == done
    assert decide(index, write, True) == failed        # both readings agree here


def test_replay_counts_match_the_table(cp):
    rng = np.random.default_rng(5)
    keys = sorted(TABLE)
    pick = rng.integers(0, len(keys), 5000)
    idx = np.array([keys[k][0] for k in pick], dtype=np.uint64)
    write = np.array([keys[k][1] for k in pick])
    exc = rng.random(5000) < 0.1
    want = Counter((keys[k][0], keys[k][1], TABLE[keys[k]][int(e)]) for k, e in zip(pick, exc))
    got = report_counts(replay(Trace.from_arrays(idx, write, exception=exc),
                               policy_decider(cp)))
    assert got == dict(want)


POLICY = """
[policy]
default = 'allow'
[[rule]]
msr = 0x10
action = 'constant'
value = 1
writes = 'gp'
[[rule]]
msr = 0x11
action = 'allow'
log = true
[[rule]]
msr = 0x12
action = 'deny'
log = false
[unknown]
action = 'ignore'
"""


@pytest.mark.parametrize("index,write,kernel,want", [
    (0x10, False, KernelMsr.HANDLED, "constant"),
    (0x10, True, KernelMsr.HANDLED, "deny"),           # constant with writes = "gp"
    (0x11, True, KernelMsr.HANDLED, "forward"),        # allow + log
    (0x12, False, KernelMsr.HANDLED, "deny"),          # filter #GP without an exit
    (0x13, False, KernelMsr.HANDLED, "kernel"),
    (0x13, False, KernelMsr.UNKNOWN, "ignore"),        # [unknown] ignore
    (0x13, False, KernelMsr.INVALID, "gp-kernel"),     # [invalid] is the kernel's #GP
])
def test_verdict_kinds(index, write, kernel, want):
    assert verdict(compile_policy(parse_policy(POLICY)), index, write, kernel) == want


def test_ambiguous_failure_names_both_readings_unless_the_kernel_says():
    cp = compile_policy(parse_policy(POLICY))
    assert policy_decider(cp)(0x13, False, True) == "gp-kernel|ignore"
    assert policy_decider(cp, lambda i, w: KernelMsr.UNKNOWN)(0x13, False, True) == "ignore"
    assert policy_decider(cp, lambda i, w: KernelMsr.INVALID)(0x13, False, True) == "gp-kernel"
    assert policy_decider(cp, lambda i, w: None)(0x13, False, True) == "gp-kernel|ignore"
    assert policy_decider(cp, lambda i, w: KernelMsr.UNKNOWN)(0x13, False, False) == "kernel"


def test_kernel_classifier_is_asked_about_the_event_itself():
    cp = compile_policy(parse_policy(POLICY))
    seen = []

    def kernel(index, write):
        seen.append((index, write))
        return KernelMsr.UNKNOWN if (index, write) == (0x13, True) else KernelMsr.INVALID

    decide = policy_decider(cp, kernel)
    assert decide(0x13, True, True) == "ignore"
    assert decide(0x13, False, True) == "gp-kernel"
    assert seen == [(0x13, True), (0x13, False)]


QUIET_DENY = """
[policy]
default = 'deny'
log = false
[[rule]]
msr = 0x10
action = 'allow'
"""


def test_filter_denial_with_no_exit_is_deny_whatever_kvm_would_do():
    """Nothing logged, nothing answered in user space: the compiled exit mask is 0, so the
    filter's denial is KVM's own #GP (docs/kvm-msr.md §3-§4) and replay calls it "deny"."""
    from kvmgate.engine.verdict import replay_verdict
    cp = compile_policy(parse_policy(QUIET_DENY, "quiet.toml"))
    assert cp.exit_mask == 0
    for kernel in KernelMsr:
        for write in (False, True):
            assert replay_verdict(cp, 0x1A0, write, kernel) == "deny"
            assert replay_verdict(cp, UNLISTED, write, kernel) == "deny"
    assert [replay_verdict(cp, 0x10, False, k) for k in KernelMsr] == \
        ["kernel", "gp-kernel", "gp-kernel"]


AUDITED = """
[policy]
default = 'allow'
mode = 'audit'
[[rule]]
msr = 0x40000123
action = 'emulate'
allowed = [0x1111]
[[rule]]
msr = 0x1a0
action = 'deny'
[[rule]]
msr = 0x35
action = 'constant'
value = 7
writes = 'gp'
[unknown]
action = 'ignore'
"""

# (index, write) -> verdicts for KVM HANDLED / UNKNOWN / INVALID, the same in audit and enforce
# mode: "would #GP" is a denial as #GP is; an emulate write's value decides, so it is "emulate"
AUDITED_TABLE = {
    (0x40000123, False): ["emulate"] * 3,
    (0x40000123, True): ["emulate"] * 3,
    (0x1A0, False): ["deny"] * 3,
    (0x1A0, True): ["deny"] * 3,
    (0x35, False): ["constant"] * 3,
    (0x35, True): ["deny"] * 3,
    (0x99, False): ["kernel", "ignore", "gp-kernel"],
    (0x99, True): ["kernel", "ignore", "gp-kernel"],
}


@pytest.mark.parametrize("mode", [None, "audit", "enforce"])
def test_audit_mode_replays_as_enforce_mode(mode):
    from kvmgate.engine.verdict import replay_verdict
    pytest.importorskip("kvmgate.engine._engine", reason="audit-mode verdicts need the C engine")
    cp = compile_policy(parse_policy(AUDITED, "audited.toml"))
    got = {key: [replay_verdict(cp, *key, k, mode=mode) for k in KernelMsr] for key in AUDITED_TABLE}
    assert got == AUDITED_TABLE


PY_VERDICTS = """
[policy]
default = 'deny'
[[rule]]
msr = 0x40000001
action = 'emulate'
allowed = [5]
initial = 1
[[rule]]
msr = 0x40000002
action = 'ignore'
[[rule]]
msr = 0x40000003
action = 'constant'
value = 9
"""


@pytest.mark.parametrize("index,write,data,want", [
    (0x40000001, True, 5, ("emulate", "written", 0)),       # an allowed value is stored
    (0x40000001, True, 6, ("emulate", "#GP", 0)),
    (0x40000001, False, 0, ("emulate", "value", 1)),        # the initial value
    (0x40000002, True, 7, ("ignore", "dropped", 0)),
    (0x40000002, False, 0, ("ignore", "value", 0)),
    (0x40000003, True, 7, ("constant", "dropped", 0)),      # writes = 'ignore' (the default)
    (0x40000003, False, 0, ("constant", "value", 9)),
    (0x40000004, True, 7, ("deny", "#GP", 0)),
])
def test_python_verdicts_by_hand(index, write, data, want):
    """The Python path's verdicts (no C engine), against expectations read off the policy."""
    from kvmgate.engine.verdict import python_verdict
    cp = compile_policy(parse_policy(PY_VERDICTS, "p.toml"))
    v = python_verdict(cp, index, write, 4, data)
    assert (v.action, v.result, v.value) == want


# Every field of a verdict, by hand from the policy below (docs: a rule's description is
# "FILE:LINE (rule N)", the default's "[policy] default", a section's "[unknown]"; `allow` with
# log = true is carried out host-initiated, "forward"; a deny default logs; an exit reason the
# policy has no section for is #GP with no action and no record).
WHOLE = """
[policy]
default = 'deny'
[unknown]
action = 'ignore'
log = true
[[rule]]
msr = 0x40000001
action = 'emulate'
allowed = [5]
initial = 1
log = true
[[rule]]
msr = 0x40000005
action = 'allow'
log = true
[[rule]]
msr = 0x40000003
action = 'constant'
value = 9
log = true
"""
WHOLE_TABLE = [
    # (index, write, reason, data): (action, result, value, rule, log, would_deny, value_dep)
    ((0x40000001, True, 4, 5), ("emulate", "written", 0, "whole.toml:7 (rule 1)", True, False,
                                True)),
    ((0x40000001, True, 4, 6), ("emulate", "#GP", 0, "whole.toml:7 (rule 1)", True, False,
                                True)),
    ((0x40000001, False, 4, 0), ("emulate", "value", 1, "whole.toml:7 (rule 1)", True, False,
                                 False)),
    ((0x40000005, True, 4, 3), ("forward", "host", 0, "whole.toml:13 (rule 2)", True, False,
                                False)),
    ((0x40000005, False, 4, 0), ("forward", "host", 0, "whole.toml:13 (rule 2)", True, False,
                                 False)),
    ((0x40000003, False, 4, 0), ("constant", "value", 9, "whole.toml:17 (rule 3)", True, False,
                                 False)),
    ((0x40000003, True, 4, 7), ("constant", "dropped", 0, "whole.toml:17 (rule 3)", True,
                                False, False)),
    ((0x40000004, False, 4, 0), ("deny", "#GP", 0, "[policy] default", True, False, False)),
    ((0x123, False, 2, 0), ("ignore", "value", 0, "[unknown]", True, False, False)),
    ((0x123, True, 2, 8), ("ignore", "dropped", 0, "[unknown]", True, False, False)),
    ((0x123, True, 1, 0), (None, "#GP", 0, "", False, False, False)),     # no [invalid]
]


@pytest.mark.parametrize("key,want", WHOLE_TABLE)
def test_python_verdicts_whole(key, want):
    from kvmgate.engine.verdict import python_verdict
    cp = compile_policy(parse_policy(WHOLE, "whole.toml"))
    assert tuple(python_verdict(cp, *key)) == want


@pytest.mark.parametrize("key,want", WHOLE_TABLE)
def test_engine_verdicts_whole(key, want):
    from kvmgate.engine.verdict import verdict
    pytest.importorskip("kvmgate.engine._engine", reason="the C engine's verdicts")
    cp = compile_policy(parse_policy(WHOLE, "whole.toml"))
    assert tuple(verdict(cp, *key)) == want


def test_without_the_engine_verdict_is_the_python_one_and_audit_mode_says_why(monkeypatch):
    from kvmgate.engine import binding
    from kvmgate.engine.verdict import verdict
    monkeypatch.setattr(binding, "available", lambda: False)
    monkeypatch.setattr(binding, "unavailable_reason", lambda: "no compiler (test)")
    cp = compile_policy(parse_policy(WHOLE, "whole.toml"))
    assert [tuple(verdict(cp, *key)) for key, _ in WHOLE_TABLE] == [w for _, w in WHOLE_TABLE]
    assert [tuple(verdict(cp, *key, mode="enforce")) for key, _ in WHOLE_TABLE] == \
        [w for _, w in WHOLE_TABLE]
    with pytest.raises(binding.EngineUnavailable) as e:
        verdict(cp, 0x40000004, False, 4, mode="audit")
    assert str(e.value) == "audit-mode verdicts need the C engine: no compiler (test)"
