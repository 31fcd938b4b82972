"""The C engine's decisions with hand-written expectations (audit mode, verdicts, registers
across policy swaps) and the audit ring (C and pure-Python consumers, drops, decoding)."""
import struct
import time

import pytest

from kvmgate.engine import Engine, Ring, State, binding, decode, verdict
from kvmgate.engine import ring as ring_mod
from kvmgate.engine.binding import (
    DF_LOG,
    DF_STATE_FULL,
    DF_WOULD_DENY,
    RES_DROPPED,
    RES_GP,
    RES_HOST,
    RES_VALUE,
    RES_WRITTEN,
)
from kvmgate.engine.table import read_table
from kvmgate.policy import compile_policy, parse_policy

from ..engine_policies import require_engine
from .test_engine_table import POLICY


@pytest.fixture(autouse=True)
def _engine_built():
    require_engine()
FILTER, UNKNOWN, INVAL = 4, 2, 1


@pytest.fixture(scope="module")
def cp():
    return compile_policy(parse_policy(POLICY, "t.toml"))


def test_enforce_mode(cp):
    e = Engine(cp)
    assert e.decide(0x35, False, FILTER)[:3] == (RES_VALUE, 0x10001, "constant")
    assert e.decide(0x36, True, FILTER, 5)[:3] == (RES_GP, 0, "constant")
    assert e.decide(0x186, True, FILTER, 5)[:3] == (RES_DROPPED, 0, "ignore")
    assert e.decide(0x99999, False, FILTER).rule == "[policy] default"
    assert e.decide(0x99999, False, FILTER).result == RES_GP
    assert e.decide(0x10, False, FILTER).result == RES_HOST                   # allow + log
    assert e.decide(0x5555, True, UNKNOWN)[:3] == (RES_DROPPED, 0, "ignore")
    d = e.decide(0x5555, True, INVAL)                                         # [invalid] gp, unlogged
    assert (d.result, d.action, d.counted, d.log) == (RES_GP, None, False, False)
    # emulate: mask 0xff, allowed {1,2,3}, initial 1
    assert e.decide(0xC0000082, True, FILTER, 0x103).result == RES_GP         # outside the mask
    assert e.decide(0xC0000082, True, FILTER, 4).result == RES_GP             # not allowed
    assert e.decide(0xC0000082, True, FILTER, 3).result == RES_WRITTEN
    assert e.state.get(0xC0000082) == 3


def test_audit_mode_lets_would_be_denials_happen_and_logs_them(cp):
    e = Engine(cp, mode="audit")
    for index, write, data in [(0x99999, False, 0), (0x36, True, 5), (0xC0000082, True, 4)]:
        d = e.decide(index, write, FILTER, data)
        assert d.result == RES_HOST and d.flags & DF_WOULD_DENY and d.flags & DF_LOG, hex(index)
        done = d.host_done(write, True, 0x77)
        assert done.text() == ("written (would #GP)" if write else "read 0x77 (would #GP)")
    assert e.state.get(0xC0000082) is None                    # the refused write stored nothing
    # what the policy answers itself is unchanged; KVM's own #GP (INVAL) stays #GP
    assert e.decide(0x35, False, FILTER)[:2] == (RES_VALUE, 0x10001)
    assert e.decide(0x186, True, FILTER, 1).result == RES_DROPPED
    assert e.decide(0xC0000082, True, FILTER, 2).result == RES_WRITTEN
    assert e.decide(0x5555, True, INVAL).result == RES_GP
    assert e.decide(0x36, True, FILTER, 5).host_done(True, False).result == RES_GP


def test_registers_carry_over_a_policy_swap(cp):
    st = State()
    Engine(cp, state=st).decide(0xC0000082, True, FILTER, 2)
    swapped = compile_policy(parse_policy(POLICY.replace("initial = 1", "initial = 3"), "t.toml"))
    e2 = Engine(swapped, state=st)
    assert e2.decide(0xC0000082, True, FILTER, 0x102).result == RES_GP   # checked against 2, not 3
    assert st.get(0xC0000082) == 2


def test_verdict_labels(cp):
    assert verdict(cp, 0x36, True, FILTER).label == "deny"               # constant, writes = gp
    assert verdict(cp, 0x36, False, FILTER).label == "constant"
    assert verdict(cp, 0x99999, True, FILTER).label == "deny"            # default deny
    assert verdict(cp, 0x5555, True, INVAL).label == "deny"              # no action
    assert verdict(cp, 0xC0000082, True, FILTER).result == "#GP"      # data defaults to 0: not allowed
    assert verdict(cp, 0xC0000082, True, FILTER, 1).result == "written"
    v = verdict(cp, 0xC0000082, True, FILTER, 4)
    assert (v.result, v.label, v.value_dependent) == ("#GP", "emulate", True)
    assert verdict(cp, 0x10, True, FILTER).result == "host"
    assert verdict(cp, 0x99999, True, FILTER, mode="audit").would_deny


def _record(engine, index, write, reason, data, vcpu=1, rip=0x1234):
    d = engine.decide(index, write, reason, data)
    return engine.record(d, vcpu=vcpu, rip=rip, index=index, is_write=write, reason=reason, data=data)


@pytest.mark.parametrize("python_consumer", [False, True])
def test_ring_round_trip_and_drops(cp, monkeypatch, python_consumer):
    e = Engine(cp)
    r = Ring(capacity=4)
    t0 = time.time()
    recs = [_record(e, 0x35, False, FILTER, 0), _record(e, 0x36, True, FILTER, 9, rip=None),
            _record(e, 0x186, True, FILTER, 5)]
    assert all(r.push(x) for x in recs)
    assert r.push(recs[0]) and not r.push(recs[0])          # capacity 4: the fifth is dropped
    assert r.dropped == 1 and r.pending() == 4
    if python_consumer:
        monkeypatch.setattr(binding, "available", lambda: False)
    out = r.drain(e.table.rules)
    t1 = time.time()
    assert r.pending() == 0 and r.drain(e.table.rules) == []
    assert [x.logged for x in out] == [True, True, False, True]
    assert out[0].fields == {"vcpu": 1, "rip": 0x1234, "index": 0x35, "write": False, "value": 0,
                             "reason": FILTER, "action": "constant", "result": "read 0x10001",
                             "rule": "t.toml:14 (rule 3)"}
    assert out[1].fields["rip"] is None and out[1].fields["result"] == "#GP"
    assert out[1].fields["value"] == 9 and out[1].fields["write"] is True
    assert out[2].fields["result"] == "dropped"
    assert all(t0 - 1e-6 <= x.time <= t1 + 1e-6 for x in out)   # CLOCK_REALTIME, seconds


def test_ring_refuses_a_header_that_does_not_fit_its_buffer():
    r = Ring(capacity=8)
    struct.pack_into("<I", r.buffer, 8, 1 << 20)           # capacity far beyond the mapping
    with pytest.raises(ValueError, match="ring"):
        Ring(buffer=r.buffer)
    with pytest.raises(ValueError):
        binding._engine.ring_drain(r.buffer)


def test_decode_names_unknown_codes_without_failing():
    raw = ring_mod.RECORD.pack(0, 0, 0, 0, 1, 0, 99, 4, 42, 9, 0)
    rec = decode(raw, ())[0]
    assert rec.fields["action"] == "action(42)" and rec.fields["rule"] == ""


def test_emulated_registers_that_collide_in_the_state_keep_their_own_values():
    """kg_state is open addressing with linear probing from slot index * 0x9E3779B1 mod slots:
    with 8 slots, MSRs 8 apart share a home slot and form one probe chain, which a write and
    the later read must walk the same way (with free slots left, a read that walked another
    way would stop at a free slot and answer the initial value)."""
    cp8 = compile_policy(parse_policy("""
[policy]
name = "c"
default = "deny"
[[rule]]
range = [0x40000000, 0x40000040]
action = "emulate"
initial = 0x77
""", "c.toml"))
    st = State(slots=8)
    e = Engine(cp8, state=st)
    msrs = [0x40000000 + 8 * i for i in range(9)]
    for i, m in enumerate(msrs[:3]):
        assert e.decide(m, True, FILTER, 0x100 + i).result == RES_WRITTEN
    for i, m in enumerate(msrs[:3]):
        assert e.decide(m, False, FILTER)[:2] == (RES_VALUE, 0x100 + i)
        assert st.get(m) == 0x100 + i
    assert e.decide(msrs[1], True, FILTER, 0x555).result == RES_WRITTEN    # rewrite in place
    assert [st.get(m) for m in msrs[:3]] == [0x100, 0x555, 0x102]
    assert st.get(msrs[3]) is None and e.decide(msrs[3], False, FILTER)[:2] == (RES_VALUE, 0x77)
    # fill the other five slots; a ninth register finds none: #GP, flagged, the rest untouched
    for i, m in enumerate(msrs[3:8], 3):
        assert e.decide(m, True, FILTER, 0x100 + i).result == RES_WRITTEN
    d = e.decide(msrs[8], True, FILTER, 1)
    assert (d.result, d.action, d.flags & DF_STATE_FULL) == (RES_GP, "emulate", DF_STATE_FULL)
    assert e.decide(msrs[8], False, FILTER)[:2] == (RES_VALUE, 0x77)
    assert [st.get(m) for m in msrs[:8]] == [0x100, 0x555] + [0x100 + i for i in range(2, 8)]


def test_each_emulate_rule_checks_against_its_own_allowed_values():
    """Two emulate rules: the second rule's allowed values sit after the first's in the table
    (a non-zero offset into the allowed section)."""
    two = compile_policy(parse_policy("""
[policy]
name = "two"
default = "deny"
[[rule]]
msr = 0x40000000
action = "emulate"
allowed = [1, 2]
initial = 1
[[rule]]
msr = 0x40000001
action = "emulate"
allowed = [10, 20, 30]
initial = 10
""", "two.toml"))
    e = Engine(two)
    assert sorted(a[5:] for a in read_table(e.table.data).actions if a[6]) == [(0, 2), (2, 3)]
    for m, ok, bad in ((0x40000000, (1, 2), (10, 20, 30, 3)),
                       (0x40000001, (10, 20, 30), (1, 2, 0, 31))):
        for x in ok:
            assert e.decide(m, True, FILTER, x).result == RES_WRITTEN, (hex(m), x)
        for x in bad:
            assert e.decide(m, True, FILTER, x).result == RES_GP, (hex(m), x)


def test_verdict_engine_cache_lets_a_dead_policy_go():
    """`verdict` keeps one C engine per live CompiledPolicy; when the policy is collected its
    engine and table go too (a long `trace replay` over many policies must not grow)."""
    import gc
    import importlib
    verdict_mod = importlib.import_module("kvmgate.engine.verdict")
    p = compile_policy(parse_policy(POLICY, "t.toml"))
    key = id(p)
    assert verdict_mod.verdict(p, 0x35, False, FILTER).value == 0x10001
    assert key in verdict_mod._tables
    first = verdict_mod._tables[key][2]
    verdict_mod.verdict(p, 0x36, False, FILTER)
    assert verdict_mod._tables[key][2] is first                    # reused, not rebuilt
    del p
    gc.collect()
    assert key not in verdict_mod._tables
