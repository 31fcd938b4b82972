"""The C audit drain (csrc/auditfmt.c via kvmgate.engine.auditsink) writes what
kvmgate/audit.py writes: random audit-ring records (every action, result, reason, flag; rules
with quotes and non-ASCII text; times in and out of order; tight rate limits) drained in C into
one AuditLog, and decoded and handed record by record to AuditLog.record/count of another
(its clock set to each record's time): the same bytes, counters, suppressed counts, and the
same "suppressed" records at close."""
import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmgate.audit import AuditLog
from kvmgate.engine import binding
from kvmgate.engine.auditsink import AuditSink, rules_for
from kvmgate.engine.ring import RECORD, Ring, decode, deliver
from kvmgate.engine.table import EngineTable

from ..engine_policies import require_engine

pytestmark = pytest.mark.differential
U64 = (1 << 64) - 1
NOW_NS = 1_712_345_678_123_456_789


@pytest.fixture(autouse=True)
def _engine_built():
    require_engine()


rules_text = st.lists(st.one_of(st.just(""), st.text(max_size=12),
                                st.sampled_from(['p.toml:3 (rule 1)', '[unknown]', 'a"b\\c', 'é€\n'])),
                      min_size=1, max_size=4)


@st.composite
def records(draw, nrules):
    t = draw(st.one_of(st.integers(NOW_NS - 3 * 10**9, NOW_NS + 3 * 10**9),
                       st.integers(0, 2**63)))
    flags = draw(st.integers(0, 15))
    return RECORD.pack(
        t, draw(st.integers(0, U64)), draw(st.sampled_from([0, 1, U64, 0x1234])),
        draw(st.integers(0, U64)), draw(st.sampled_from([0x10, 0x1A0, 0x35, 0x4B564DFF, 0xFFFFFFFF])),
        draw(st.integers(0, 3)), draw(st.one_of(st.integers(0, nrules), st.just(0xFFFFFFFF))),
        draw(st.sampled_from([1, 2, 4, 8])), draw(st.sampled_from([1, 2, 3, 4, 5, 0, 9])),
        draw(st.sampled_from([1, 2, 3, 4, 5])), flags | (4 if draw(st.booleans()) else 0))


def _python(raws, rules, rate, burst):
    now = [0.0]
    buf = io.StringIO()
    log = AuditLog(buf, rate=rate, burst=burst, clock=lambda: now[0])
    for raw in raws:
        (rec,) = decode(raw, rules)
        now[0] = rec.time
        deliver([rec], log)
    return log, buf


def _c(raws, rules, rate, burst, batches):
    buf = io.StringIO()
    log = AuditLog(buf, rate=rate, burst=burst, clock=lambda: 0.0)
    sink = AuditSink(log)
    ring = Ring(1024)
    c_rules = rules_for(EngineTable(b"", tuple(rules), "enforce"))
    step = max(1, len(raws) // batches)
    for i in range(0, len(raws), step):
        for raw in raws[i:i + step]:
            assert ring.push(raw)
        sink.drain(ring, c_rules)
    return log, buf, sink


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.data())
def test_c_drain_writes_what_audit_py_writes(data):
    rules = data.draw(rules_text)
    raws = data.draw(st.lists(records(len(rules)), max_size=60))
    rate = data.draw(st.sampled_from([0.5, 3.0, 20.0, 1e6]))
    burst = data.draw(st.sampled_from([1, 2, 20]))
    batches = data.draw(st.integers(1, 5))
    p_log, p_buf = _python(raws, rules, rate, burst)
    c_log, c_buf, sink = _c(raws, rules, rate, burst, batches)
    assert c_buf.getvalue() == p_buf.getvalue()
    assert c_log.summary() == p_log.summary()
    assert (c_log.written, c_log.suppressed, c_log.failed) == (p_log.written, p_log.suppressed, p_log.failed)
    sink.settle()                     # owed suppressed counts: written by close()
    p_log.clock = c_log.clock = lambda: 99.0
    p_log.close()
    c_log.close()
    tail = len(p_buf.getvalue().splitlines()) - len(c_buf.getvalue().splitlines())
    assert tail == 0
    assert sorted(c_buf.getvalue().splitlines()) == sorted(p_buf.getvalue().splitlines())


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.one_of(st.floats(0, 2**34, allow_nan=False), st.integers(0, 2**64 - 1).map(lambda n: n / 1e9)))
def test_time_is_pythons_repr_of_round6(t):
    assert binding.native().format_time(t) == repr(round(t, 6))


def test_lines_validate_against_the_schema():
    jsonschema = pytest.importorskip("jsonschema")
    from kvmgate.schemas import schema as load
    schema = load("audit")
    raws = [RECORD.pack(NOW_NS + i, 0x1000, 5, 7, 0x1A0, 0, 0, reason, action, result, 0x4 | 0x2 | w)
            for i, (reason, action, result, w) in enumerate(
                [(4, 1, 4, 0), (2, 2, 1, 0), (1, 2, 3, 1), (4, 4, 2, 1), (4, 3, 1, 0)])]
    _log, buf, _ = _c(raws, ["r.toml:1 (rule 1)"], 1e6, 100, 1)
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert len(lines) == 5
    for x in lines:
        jsonschema.validate(x, schema)
