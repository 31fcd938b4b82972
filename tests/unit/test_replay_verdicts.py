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
