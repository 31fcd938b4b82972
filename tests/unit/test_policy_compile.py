"""Compilation on intervals gives exactly what the per-MSR compiler gave (kept here as the
oracle: a table entry per MSR and direction, windows over points, a bitmap bit per MSR), and a
range over every MSR costs no more than a single MSR."""
import os
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmgate.errors import PolicyError
from kvmgate.msr import names
from kvmgate.msr.model import (
    EXIT_REASON_FILTER,
    MAX_NMSRS,
    MAX_RANGES,
    READ,
    WRITE,
    X2APIC_FIRST,
    X2APIC_LAST,
    MsrRange,
    windows,
)
from kvmgate.policy import compile_policy, parse_policy
from kvmgate.policy.plan import ActionTable, merge
from kvmgate.policy.plan import windows as interval_windows

EXAMPLES = 2000 if os.environ.get("KVMGATE_SLOW") == "1" else 120

# --- the per-MSR compiler this replaced (filter and actions; the oracle) ---------------------


def oracle_resolve(policy):
    table = {}
    for rule in policy.rules:
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


def oracle_plan(exceptions, default_allow):
    reads, writes = exceptions[READ], exceptions[WRITE]

    def rng(flags, lo, hi, flip):
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


def oracle_compile(policy):
    """(ranges or None when more than 16, {(index, write): (kind, rule where)})."""
    table = oracle_resolve(policy)
    default_allow = policy.default == "allow"
    exceptions = {READ: set(), WRITE: set()}
    actions = {}
    for (index, access), rule in table.items():
        kernel_handles = rule.action == "allow" and not rule.log
        if X2APIC_FIRST <= index <= X2APIC_LAST:
            continue
        if kernel_handles != default_allow:
            exceptions[access].add(index)
        if not kernel_handles:
            actions[(index, access == WRITE)] = ("forward" if rule.action == "allow" else rule.action,
                                                 rule.where)
    ranges = oracle_plan(exceptions, default_allow)
    return (ranges if len(ranges) <= MAX_RANGES else None), actions


# --- random policies over MSRs near the interesting edges ------------------------------------

EDGES = [0, 0x7E0, 0x2FF0, 0x5FF0, 0xC0000000, 0xFFFFFF80]
index = st.builds(lambda base, off: min(base + off, 0xFFFFFFFF), st.sampled_from(EDGES), st.integers(0, 0x140))


@st.composite
def rules(draw):
    lo = draw(index)
    span = draw(st.sampled_from([0, 0, 1, 5, 63, 64, 65, 0x120, 0x3001]))
    hi = min(lo + span, 0xFFFFFFFF)
    action = draw(st.sampled_from(["allow", "deny", "ignore", "constant"]))
    text = ["[[rule]]", f"range = [{lo:#x}, {hi:#x}]",
            f"access = \"{draw(st.sampled_from(['read', 'write', 'both']))}\"", f"action = \"{action}\""]
    if action == "constant":
        text.append(f"value = {draw(st.integers(0, 2))}")
    if draw(st.booleans()):
        text.append(f"log = {str(draw(st.booleans())).lower()}")
    return "\n".join(text)


@settings(max_examples=EXAMPLES)
@given(st.sampled_from(["allow", "deny"]), st.lists(rules(), max_size=6))
def test_interval_compiler_matches_per_msr_compiler(default, rule_texts):
    text = f"[policy]\ndefault = \"{default}\"\nx2apic = \"warn\"\n\n" + "\n\n".join(rule_texts)
    policy = parse_policy(text, "p.toml")
    try:
        o_ranges, o_actions = oracle_compile(policy)
        o_err = None
    except PolicyError as e:
        o_err = str(e)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cp = compile_policy(policy)
            err = None
        except PolicyError as e:
            err = str(e)
    if o_err is not None or err is not None:
        if o_err is not None and "contradicts" in o_err:
            assert err == o_err
        else:
            assert o_err is None and o_ranges is None and "filter ranges" in err
        return
    assert o_ranges is not None and list(cp.filter.ranges) == o_ranges or \
        (not o_ranges and default == "deny" and len(cp.filter.ranges) == 1)
    probe = {i for r in policy.rules for i in (r.lo - 1, r.lo, r.lo + 1, r.hi - 1, r.hi, r.hi + 1)}
    probe |= {i for base in EDGES for i in range(base, base + 0x150, 7)}
    for i in sorted(x for x in probe if 0 <= x <= 0xFFFFFFFF and not X2APIC_FIRST <= x <= X2APIC_LAST):
        for write in (False, True):
            act = cp.actions.get(i << 1 | write)
            want = o_actions.get((i, write))
            assert (act.kind.value, act.rule) == want if want else act is None, (hex(i), write)
            assert cp.action_for(i, write, EXIT_REASON_FILTER) == (act or cp.default_action)


@settings(max_examples=EXAMPLES)
@given(st.lists(st.tuples(st.integers(0, 0x9000), st.integers(0, 0x4000)), max_size=8))
def test_interval_windows_match_point_windows(pairs):
    ivs = merge((lo, lo + n) for lo, n in pairs)
    points = [i for lo, hi in ivs for i in range(lo, hi + 1)]
    got, count = interval_windows(ivs)
    assert got == windows(points) and count == len(got)
    capped, capped_count = interval_windows(ivs, cap=2)
    assert capped_count == count and capped == got[:3]


def test_action_table_looks_up_points_and_spans():
    t = ActionTable()
    t.add(5, 5, False, "a")
    t.add(0x100, 0x100 + ActionTable.SHORT, True, "b")
    assert t.get(5 << 1) == "a" and t.get(5 << 1 | 1) is None
    assert t.get(0x100 << 1 | 1) == "b" and t.get((0x100 + ActionTable.SHORT) << 1 | 1) == "b"
    assert t.get((0x101 + ActionTable.SHORT) << 1 | 1, "d") == "d" and t.get(0x100 << 1) is None
    assert len(t) == 1 + ActionTable.SHORT + 1 and t.has_spans
    assert [r[:3] for r in t.rows()] == [(5, 5, False), (0x100, 0x100 + ActionTable.SHORT, True)]
    assert dict(t.items()) == {5 << 1: "a", **{i << 1 | 1: "b" for i in range(0x100, 0x101 + ActionTable.SHORT)}}
    t.add(0, 0xFFFFFFFF, False, "c")
    with pytest.raises(PolicyError, match="rows"):
        next(t.items())


def test_wide_rules_compile_as_intervals():
    one = "[policy]\nx2apic = 'warn'\n[[rule]]\nrange = [0, 0xffffffff]\naction = 'ignore'\n"
    many = "[policy]\nx2apic = 'warn'\n" + \
        "[[rule]]\nrange = [0, 0xffffffff]\naction = 'ignore'\n" * 10_000
    with pytest.warns(UserWarning):
        a = compile_policy(parse_policy(one))
    with pytest.warns(UserWarning):
        b = compile_policy(parse_policy(many))
    assert a.filter == b.filter
    # three spans per direction at most: below x2APIC, above it (and no per-MSR entries)
    assert not a.actions.points and len(list(a.actions.rows())) == 4
    assert len(a.actions) == 2 * (0x100000000 - 0x100)
    assert MAX_NMSRS == 0x3000


def test_policy_modules_import_in_one_direction():
    """model <- plan <- handlers <- compile <- parse <- report: no circle, no import hidden in
    a function (the circle compile <-> handlers <-> model was hidden that way)."""
    import ast
    from pathlib import Path
    pkg = Path(__file__).resolve().parents[2] / "kvmgate" / "policy"
    graph, local = {}, []
    for path in pkg.glob("*.py"):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                deps.add(node.module.split(".")[0])
                if id(node) not in top:
                    local.append(f"{path.name}:{node.lineno}")
        graph[path.stem] = deps
    assert not local, local
    seen, done = set(), set()

    def visit(mod, trail):
        assert mod not in seen - done, " -> ".join(trail + [mod])
        if mod in done:
            return
        seen.add(mod)
        for dep in graph.get(mod, ()):
            visit(dep, trail + [mod])
        done.add(mod)

    for mod in graph:
        visit(mod, [])


def test_overlapping_agreeing_rules_give_one_row_per_deciding_rule():
    """Rule 2 overlaps the end of rule 1 and agrees with it: rule 2 (the last listed) decides
    0x1800-0x2fff, one row per direction even though rule 1 ends inside it (the segment is not
    split where the other rule ends)."""
    cp = compile_policy(parse_policy("[policy]\ndefault='allow'\n"
                                     "[[rule]]\nrange=[0x1000, 0x1fff]\naction='ignore'\n"
                                     "[[rule]]\nrange=[0x1800, 0x2fff]\naction='ignore'\n", "p.toml"))
    rows = [(lo, hi, write, act.rule) for lo, hi, write, act in cp.actions.rows()]
    assert rows == [(0x1000, 0x17FF, False, "p.toml:3 (rule 1)"), (0x1000, 0x17FF, True, "p.toml:3 (rule 1)"),
                    (0x1800, 0x2FFF, False, "p.toml:6 (rule 2)"), (0x1800, 0x2FFF, True, "p.toml:6 (rule 2)")]


X2APIC_RULES = """
[policy]
default = "allow"
x2apic = "warn"
[[rule]]
range = [0x800, 0x87f]
access = "read"
action = "deny"
[[rule]]
range = [0x800, 0x80f]
access = "write"
action = "deny"
[[rule]]
msr = 0x8f0
action = "deny"
[[rule]]
msr = 0x8f8
action = "deny"
"""


def test_x2apic_notes_one_per_rule_and_segment_in_msr_then_access_order():
    """Hand-written expectation: read before write at the same first MSR (not the shorter
    segment first), a rule over both directions noted once, and every rule after it still noted;
    each note is a PolicyWarning."""
    from kvmgate.policy.compile import PolicyWarning
    policy = parse_policy(X2APIC_RULES, "x.toml")
    with pytest.warns(PolicyWarning) as rec:
        cp = compile_policy(policy)
    assert cp.policy is policy
    notes = [n for n in cp.warnings if "x2APIC" in n]
    assert len(notes) == 4 and len(rec) >= 4
    assert all(issubclass(w.category, PolicyWarning) for w in rec)
    assert "0x800..0x87f are x2APIC MSRs" in notes[0] and "rule 1" in notes[0]
    assert "0x800..0x80f are x2APIC MSRs" in notes[1] and "rule 2" in notes[1]
    assert "0x8f0" in notes[2] and "is an x2APIC MSR" in notes[2] and "rule 3" in notes[2]
    assert "0x8f8" in notes[3] and "is an x2APIC MSR" in notes[3] and "rule 4" in notes[3]


def test_reliance_on_unknown_exits_under_ignore_msrs_names_the_unknown_table():
    policy = parse_policy('[policy]\ndefault = "allow"\n[unknown]\naction = "ignore"\n', "u.toml")
    with pytest.raises(PolicyError) as e:
        compile_policy(policy, host_ignore_msrs=True)
    assert e.value.where == "u.toml [unknown]"
    assert "kvm.ignore_msrs=Y" in e.value.what and 'host_ignore_msrs = "warn"' in e.value.what
