"""kvmgate.learn without a kernel: aggregation of recorded events, and the policy text (grouping,
names, directions, refused accesses) checked through the policy parser, compiler and model."""
import re
import tomllib

import numpy as np
import pytest

from kvmgate.errors import UserError
from kvmgate.learn import (GUARDED_MSRS, LearnedAccess, LearnResult, accesses_from_summary,
                           load_guest, render_policy, write_policy)
from kvmgate.learn.record import guard_filter
from kvmgate.msr import bitmaps, names
from kvmgate.msr.model import READ, WRITE, X2APIC_FIRST, X2APIC_LAST
from kvmgate.policy import compile_policy, parse_policy
from kvmgate.trace import Summary, Trace, TraceFile


def acc(index, write=False, events=1, failed=0, **kw):
    return LearnedAccess(index, write, events, failed, **kw)


BOTH_RUN = list(range(0x200, 0x210))               # 16 consecutive MSRs, read and written
ACCESSES = (
    [acc(i, False) for i in BOTH_RUN] + [acc(i, True, values=(0,)) for i in BOTH_RUN]
    + [acc(0x10), acc(0x1B, events=5), acc(0xC0000080)]          # read only, scattered
    + [acc(0x174, True), acc(0x175, True)]                       # a run of 2: a list, not a range
    + [acc(0x49, True, values=(1,))]                             # written only
    + [acc(0x3B, True, events=3, failed=1, values=(0,), failed_values=(5,))]   # mixed: allowed
    + [acc(0x35, events=2, failed=2, failed_values=(0,))]       # KVM #GP'd every time
    + [acc(0x4B564DFF, True, failed=1, failed_values=(7,))]
    + [acc(0x808)]                                               # x2APIC read
    + [acc(0x10A, forwarded=True, check="unknown")]              # host-initiated only
    + [acc(0x4B564D10)]                                          # unnamed
)
ALLOWED = ({(i, w) for i in BOTH_RUN for w in (False, True)}
           | {(0x10, False), (0x1B, False), (0xC0000080, False), (0x174, True), (0x175, True),
              (0x49, True), (0x3B, True), (0x808, False), (0x4B564D10, False)})
UNIVERSE = sorted({a.index for a in ACCESSES} | {0x1FF, 0x210, 0x176, 0x11, 0x809, 0x12345678})


def allowed_by(text, universe=UNIVERSE):
    cp = compile_policy(parse_policy(text, "<t>"))
    out = set()
    for i in universe:
        for access, w in ((READ, False), (WRITE, True)):
            if cp.filter.allows(i, access) and not X2APIC_FIRST <= i <= X2APIC_LAST:
                out.add((i, w))
    return out, cp


def rules(text):
    return tomllib.loads(text)["rule"]


def test_policy_allows_exactly_what_was_used():
    text = render_policy(ACCESSES, name="t")
    got, cp = allowed_by(text)
    assert got == {k for k in ALLOWED if not X2APIC_FIRST <= k[0] <= X2APIC_LAST}
    assert cp.filter.default_deny and cp.policy.default == "deny" and cp.policy.default_log
    assert cp.policy.name == "t"
    # the x2APIC read is listed too (KVM never filters it: the rule documents it)
    assert "0x808: 1 read; x2APIC: never filtered" in text


def test_grouping_ranges_lists_and_directions():
    rs = rules(render_policy(ACCESSES))
    ranges = [(r["range"], r["access"]) for r in rs if "range" in r]
    assert ranges == [(["IA32_MTRR_PHYSBASE0", "IA32_MTRR_PHYSMASK7"], "both")]
    lists = {r["access"]: r["msrs"] for r in rs if "msrs" in r}
    assert set(lists) == {"read", "write"}
    assert lists["read"] == ["IA32_TSC", "IA32_APIC_BASE", names.msr_name(0x808), 0x4B564D10,
                             "IA32_EFER"]
    assert lists["write"] == ["IA32_TSC_ADJUST", "IA32_PRED_CMD", "IA32_SYSENTER_CS", "IA32_SYSENTER_ESP"]
    assert all(r["action"] == "allow" for r in rs)
    for r in rs:                                  # every name resolves back to its index
        for m in r.get("msrs", []) + r.get("range", []):
            assert isinstance(m, int) or names.msr_index(m) is not None


def test_min_run_and_runs_never_bridge_gaps():
    seq = [acc(i) for i in (0x10, 0x11, 0x12, 0x14, 0x15)]
    rs = rules(render_policy(seq, min_run=3))
    assert [r["range"] for r in rs if "range" in r] == [["IA32_TSC", "MSR_KVM_SYSTEM_TIME"]]
    assert [r["msrs"] for r in rs if "msrs" in r] == [[0x14, 0x15]] or \
        [[names.msr_index(m) if isinstance(m, str) else m for m in r["msrs"]]
         for r in rs if "msrs" in r] == [[0x14, 0x15]]
    rs = rules(render_policy(seq, min_run=2))
    assert len([r for r in rs if "range" in r]) == 2
    rs = rules(render_policy(seq, min_run=100))
    assert [len(r["msrs"]) for r in rs] == [5]
    got, _ = allowed_by(render_policy(seq), range(0xE, 0x18))
    assert got == {(i, False) for i in (0x10, 0x11, 0x12, 0x14, 0x15)}


def test_refused_accesses_are_comments_with_reasons():
    text = render_policy(ACCESSES)
    refused = re.findall(r"^#\s+(0x[0-9a-f]+) (\S+) (read|write).*: (.*)$", text, re.M)
    assert {(int(i, 16), d) for i, _, d, _ in refused} == {(0x35, "read"), (0x4B564DFF, "write"),
                                                          (0x10A, "read")}
    why = {int(i, 16): w for i, _, _, w in refused}
    assert why[0x35] == "KVM itself answered #GP"
    assert "KVM_GET_MSRS worked" in why[0x10A] and "unknown" in why[0x10A]
    assert "MSR_0x4b564dff write of 0x7: 1 time" in text
    assert "2 reads" not in text.split("[policy]")[0]        # header is the caller's
    assert "0x3b: 3 writes (0x0), 1 #GP" in text


def test_exclude_msr_or_direction_splits_a_range():
    text = render_policy(ACCESSES, exclude=[0x205, (0x10, False), (0x206, True)])
    got, _ = allowed_by(text)
    expect = {k for k in ALLOWED if not X2APIC_FIRST <= k[0] <= X2APIC_LAST}
    expect -= {(0x205, False), (0x205, True), (0x10, False), (0x206, True)}
    assert got == expect
    assert "left out on request" in text and "0x205" in text


def test_nothing_to_allow_still_compiles():
    text = render_policy([acc(0x35, failed=1)])
    got, cp = allowed_by(text)
    assert got == set() and cp.filter.default_deny
    assert "no MSR access to allow" in text


def test_learned_access_allowed_rules():
    assert acc(1).allowed and not acc(1, failed=1).allowed and acc(1, events=2, failed=1).allowed
    assert not acc(1, forwarded=True, check="invalid").allowed
    assert acc(1, failed=1, forwarded=True, check="handled").allowed
    assert acc(1, forwarded=True, check=None).allowed                # verify=False
    assert "invalid" in acc(1, failed=1, forwarded=True, check="invalid").why_not()


def test_accesses_from_summary_any_split(tmp_path):
    ev = [(0x10, 0, 5, 0), (0x10, 0, 6, 0), (0x10, 0, 5, 0), (0x1B, 1, 9, 1), (0x1B, 1, 1, 0),
          (0x10, 1, 1, 0)] + [(0x11, 0, v, 0) for v in range(10)]
    index, write, value, exc = (np.array(c) for c in zip(*ev))
    ref = None
    for rg in (1, 3, 1000):
        t = Trace.from_arrays(index, write, value, exc, time_ns=np.arange(len(ev)) + 100, host=f"h{rg}")
        t.save(tmp_path / f"{rg}.parquet", row_group_events=rg)
        s = TraceFile(tmp_path / f"{rg}.parquet").summary()
        got = {k: (a.events, a.failed, a.values, a.failed_values, a.first_ns)
               for k, a in accesses_from_summary(s).items()}
        if ref is None:
            ref = got
        assert got == ref
    union = accesses_from_summary(Summary.merge([TraceFile(tmp_path / f"{rg}.parquet").summary()
                                                 for rg in (1, 3)]))
    assert union[(0x10, False)].events == 6 and union[(0x11, False)].values == (0, 1, 2, 3)
    assert ref[(0x10, False)] == (3, 0, (5, 6), (), 100)
    assert ref[(0x1B, True)] == (2, 1, (1,), (9,), 103)
    assert ref[(0x11, False)][0] == 10 and ref[(0x11, False)][2] == (0, 1, 2, 3)


def testguard_filter_denies_exactly_the_passthrough_candidates():
    flt = guard_filter()
    cands = {m for m, _ in (*bitmaps.DEFAULT_VMX_PASSTHROUGH, *bitmaps.DEFAULT_SVM_PASSTHROUGH,
                            *bitmaps.SPEC_CTRL_PASSTHROUGH)}
    assert cands <= set(GUARDED_MSRS)
    for i in set(GUARDED_MSRS) | {0x11, 0x1B, 0xC0000080, 0x173, 0x177, 0x200}:
        for access in (READ, WRITE):
            assert flt.allows(i, access) == (i not in GUARDED_MSRS)
    # and nothing KVM cannot pass through becomes a filtered (exiting) access
    for i in range(0, 0x2000):
        assert flt.allows(i, READ) == (i not in GUARDED_MSRS)


def test_write_policy_and_load_guest(tmp_path):
    res = LearnResult([acc(0x10)], "tracefs", str(tmp_path / "g.S"), True, 0.1, 1, 0)
    p = write_policy(res, tmp_path / "p.toml")
    assert parse_policy(p.read_text()).name == "learned-g"
    assert "Learned by `kvmgate learn` from" in p.read_text()
    with pytest.raises(UserError, match="is a directory"):
        write_policy(res, tmp_path)
    with pytest.raises(UserError, match="cannot write"):
        write_policy(res, tmp_path / "missing" / "p.toml")
    (tmp_path / "g.S").write_text("hlt\n")
    (tmp_path / "g.bin").write_bytes(b"\xf4")
    (tmp_path / "g.raw2").write_bytes(b"\xff\xfe\xf4")
    assert load_guest(tmp_path / "g.S") == b"\xf4"            # assembled where it is loaded
    assert load_guest(tmp_path / "g.bin") == b"\xf4"
    with pytest.raises(UserError, match="unknown guest file suffix '.raw2'"):
        load_guest(tmp_path / "g.raw2")
    with pytest.raises(UserError, match="cannot read guest"):
        load_guest(tmp_path / "nope.S")
    assert res.to_dict()["accesses"][0]["msr"] == "0x10"
