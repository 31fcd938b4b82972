"""Fuzzing the policy boundary: arbitrary bytes and structured mutations of valid policies go
through exactly what `kvmgate policy check` does (bytes -> UTF-8 -> TOML -> Policy -> compiled
filter).  The only allowed outcomes are a compiled policy or the project's own UserError, in one
line naming the policy.  Fixed seed; a small budget in CI, >= 50,000 inputs per kind with
KVMGATE_SLOW=1 (KVMGATE_FUZZ_EXAMPLES=N sets another count)."""
import os
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmgate.errors import UserError
from kvmgate.policy import compile_policy, parse_policy_bytes

SLOW = os.environ.get("KVMGATE_SLOW") == "1"
EXAMPLES = int(os.environ.get("KVMGATE_FUZZ_EXAMPLES", 50_000 if SLOW else 200))
SOURCE = "fuzz.toml"
SUMMARY_LINES: list[str] = []
pytestmark = pytest.mark.timeout(0 if SLOW else 300)     # slow mode runs for many minutes
COUNTS = {kind: {"inputs": 0, "accepted": 0, "refused": 0} for kind in ("bytes", "mutations")}

SEEDS = [
    (Path(__file__).resolve().parents[2] / "kvmgate" / "examples" / "deny-by-default.toml").read_text(),
    """[policy]\ndefault = "allow"\nx2apic = "warn"\naudit_rate = 5.5\naudit_burst = 3\n
[[rule]]\nrange = [0x186, 0x189]\naccess = "write"\naction = "ignore"\n
[[rule]]\nmsr = 0x35\naccess = "read"\naction = "constant"\nvalue = 0x10001\nwrites = "gp"\n
[[rule]]\nmsr = "IA32_LSTAR"\naction = "emulate"\ninitial = 0\nwrite_mask = 0xffff\nallowed = [1, 2]\n
[unknown]\naction = "ignore"\nlog = true\n""",
]
TOKENS = ["nan", "inf", "-inf", "-1", "0", "1", "0x100000000", "9" * 400, "1e400", "-0.0", "true",
          "false", '"allow"', '"deny"', '"emulate"', '"both"', '"read"', '"LSTAR"', '"nope"',
          '"0x10"', '""', "[1, 2]", "[]", '["read"]', "[[1]]", "{a = 1}", "{}", "[0, 0xffffffff]",
          "[0xffffffff, 0]", '"\\u0000"', "1979-05-27", "'''x'''", "[" * 60, "0o777", "0b101"]
HEADERS = ["[policy]", "[[rule]]", "[rule]", "[unknown]", "[[unknown]]", "[invalid]", "[x]",
           "[[policy]]", "[policy.sub]", "[rule.a]"]
KEYS = ["name", "default", "log", "x2apic", "host_ignore_msrs", "audit_rate", "audit_burst", "msr",
        "msrs", "range", "access", "action", "value", "writes", "initial", "write_mask", "allowed",
        "comment", "policy", "rule", "unknown", "invalid", "bogus"]


def check(kind: str, data: bytes) -> None:
    """The property: compiled, or UserError in one line naming the policy source."""
    COUNTS[kind]["inputs"] += 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile_policy(parse_policy_bytes(data, SOURCE), host_ignore_msrs=False)
    except UserError as e:
        COUNTS[kind]["refused"] += 1
        text = str(e)
        assert text.startswith(SOURCE) and "\n" not in text and len(text) < 1000, text
    else:
        COUNTS[kind]["accepted"] += 1


@st.composite
def mutated(draw) -> bytes:
    lines = draw(st.sampled_from(SEEDS)).splitlines()
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["value", "key", "delete", "duplicate", "header", "bytes", "swap"]))
        i = draw(st.integers(0, len(lines) - 1)) if lines else 0
        if op == "value" and lines and "=" in lines[i]:
            lines[i] = lines[i].split("=", 1)[0] + "= " + draw(st.sampled_from(TOKENS))
        elif op == "key":
            lines.insert(i, f"{draw(st.sampled_from(KEYS))} = {draw(st.sampled_from(TOKENS))}")
        elif op == "delete" and lines:
            del lines[i]
        elif op == "duplicate" and lines:
            lines.insert(i, lines[i])
        elif op == "header":
            lines.insert(i, draw(st.sampled_from(HEADERS)))
        elif op == "swap" and len(lines) > 1:
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "bytes" and lines:
            line = lines[i].encode()
            at = draw(st.integers(0, len(line)))
            lines[i] = (line[:at] + draw(st.binary(max_size=4)) + line[at:]).decode("latin-1")
    return "\n".join(lines).encode("latin-1", "replace")


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None)
@given(st.binary(max_size=512) | st.text(max_size=300).map(str.encode))
def test_arbitrary_bytes(data):
    check("bytes", data)


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None)
@given(mutated())
def test_structured_mutations(data):
    check("mutations", data)


def test_seeds_are_valid_and_summary():
    for seed in SEEDS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile_policy(parse_policy_bytes(seed.encode(), SOURCE))
    for kind, c in COUNTS.items():
        SUMMARY_LINES.append(f"fuzz policy ({kind}): {c['inputs']} inputs, {c['accepted']} compiled, "
                             f"{c['refused']} refused with the project's error, 0 escapes")
