"""Property: for random policies, the exported kvm-filter-json document says exactly what the
compiled plan does.  An interpreter of the JSON alone (first matching range, then the default;
the action table per reason) is compared with CompiledPolicy's filter and action_for at every
rule edge and at random MSRs, and the document validates against the shipped schema.
Fixed seed; KVMGATE_FUZZ_EXAMPLES=N for another count."""
import json
import os
import warnings

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from kvmgate.errors import PolicyError
from kvmgate.msr.model import (EXIT_REASON_FILTER, EXIT_REASON_INVAL, EXIT_REASON_UNKNOWN, READ,
                               WRITE, X2APIC_FIRST, X2APIC_LAST)
from kvmgate.policy import compile_policy, parse_policy
from kvmgate.policy.export import export_text, load_export
from kvmgate.schemas import schema

EXAMPLES = int(os.environ.get("KVMGATE_FUZZ_EXAMPLES", "200"))
VALIDATOR = Draft202012Validator(schema("kvm-filter"))
BASES = [0x0, 0x10, 0x174, 0x1FF0, 0x2FFF, 0x3000, 0x4B564D00, 0x40000000, 0xC0000080,
         0xC0010000, 0xC0011FF0, 0xFFFFFFF0]


@st.composite
def policies(draw) -> str:
    out = [f"[policy]\ndefault = {draw(st.sampled_from(['allow', 'deny']))!r}\n"
           f"log = {str(draw(st.booleans())).lower()}\nx2apic = 'warn'\n"]
    for _ in range(draw(st.integers(0, 8))):
        lo = draw(st.sampled_from(BASES)) + draw(st.integers(0, 0x20))
        hi = min(lo + draw(st.sampled_from([0, 1, 3, 7, 63, 64, 200, 0x3000])), 0xFFFFFFFF)
        action = draw(st.sampled_from(["allow", "deny", "ignore", "constant", "emulate"]))
        rule = [f"[[rule]]\nrange = [{lo:#x}, {hi:#x}]",
                f"access = {draw(st.sampled_from(['read', 'write', 'both']))!r}",
                f"action = {action!r}", f"log = {str(draw(st.booleans())).lower()}"]
        if action == "constant":
            rule += [f"value = {draw(st.integers(0, 2**64 - 1)):#x}",
                     f"writes = {draw(st.sampled_from(['ignore', 'gp']))!r}"]
        elif action == "emulate":
            rule += [f"initial = {draw(st.integers(0, 2**64 - 1)):#x}",
                     f"write_mask = {draw(st.integers(0, 2**64 - 1)):#x}"]
            if draw(st.booleans()):
                rule.append(f"allowed = [{', '.join(hex(v) for v in draw(st.lists(st.integers(0, 2**64 - 1), max_size=3)))}]")
        out.append("\n".join(rule) + "\n")
    for table in ("unknown", "invalid"):
        if draw(st.booleans()):
            out.append(f"[{table}]\naction = {draw(st.sampled_from(['gp', 'ignore']))!r}\n"
                       f"log = {str(draw(st.booleans())).lower()}\n")
    return "\n".join(out)


def json_allows(doc, index, access) -> bool:
    """KVM's rule (docs/kvm-msr.md §3) over the document alone."""
    if X2APIC_FIRST <= index <= X2APIC_LAST:
        return True
    for r in doc["filter"]["ranges"]:
        if r["flags"] & access and r["base"] <= index < (r["base"] + r["nmsrs"]) & 0xFFFFFFFF:
            k = index - r["base"]
            return bool(bytes.fromhex(r["bitmap"])[k // 8] >> (k % 8) & 1)
    return doc["filter"]["flags"] == 0


def json_answer(doc, index, write, reason):
    acts = doc["actions"]
    if reason == EXIT_REASON_FILTER:
        hits = [r for r in acts["filter"]["rules"] if r["first"] <= index <= r["last"]
                and r["access"] == ("write" if write else "read")]
        assert len(hits) <= 1
        if hits:
            return {k: v for k, v in hits[0].items() if k not in ("first", "last", "access")}
        return acts["filter"]["default"]
    return acts["unknown" if reason == EXIT_REASON_UNKNOWN else "invalid"]


def action_dict(act):
    if act is None:
        return None
    d = {"action": act.kind.value, "log": act.log, "rule": act.rule}
    if act.kind.value == "constant":
        d |= {"value": hex(act.value), "writes": act.writes}
    elif act.kind.value == "emulate":
        d |= {"initial": hex(act.initial), "write_mask": hex(act.write_mask),
              "allowed": None if act.allowed is None else [hex(v) for v in act.allowed]}
    return d


@pytest.mark.timeout(300)
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None)
@given(policies(), st.lists(st.integers(0, 0xFFFFFFFF), min_size=8, max_size=8))
def test_export_equals_the_compiled_plan(text, randoms):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cp = compile_policy(parse_policy(text, "fuzz.toml"), host_ignore_msrs=False)
    except PolicyError:
        assume(False)
    doc = json.loads(export_text(cp))
    assert not list(VALIDATOR.iter_errors(doc))
    flt, mask = load_export(doc)
    assert flt == cp.filter and mask == cp.exit_mask
    points = set(randoms)
    for r in cp.policy.rules:
        points.update(p for p in (r.lo - 1, r.lo, r.hi, r.hi + 1) if 0 <= p <= 0xFFFFFFFF)
    for r in doc["filter"]["ranges"]:
        points.update(p for p in (r["base"] - 1, r["base"], r["last"], r["last"] + 1) if 0 <= p <= 0xFFFFFFFF)
    for index in sorted(points):
        for access in (READ, WRITE):
            assert json_allows(doc, index, access) == cp.filter.allows(index, access), (hex(index), access)
            for reason in (EXIT_REASON_FILTER, EXIT_REASON_UNKNOWN, EXIT_REASON_INVAL):
                want = action_dict(cp.action_for(index, access == WRITE, reason))
                assert json_answer(doc, index, access == WRITE, reason) == want, (hex(index), access, reason)
