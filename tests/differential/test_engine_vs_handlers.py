"""The C engine against the Python exit path: for random policies and random sequences of MSR
exits, the engine-backed handler (kvmgate.engine.make_engine_handler: kg_decide, kg_host_done,
kg_record_fill, the audit ring, decode) gives the same reply, the same AuditLog calls (record
keyword arguments or count arguments, result texts included) and the same emulated registers
as kvmgate.policy.handlers.make_handler.  Fixed seed in CI; KVMGATE_SLOW=1 for many more."""
import pytest
from hypothesis import given, settings, strategies as st

from kvmgate.engine import Engine, Ring, make_engine_handler
from kvmgate.engine.ring import deliver
from kvmgate.policy.handlers import Registers, make_handler

from ..conftest import SLOW
from ..engine_policies import CallLog, Exit, exits, policies, python_reply, require_engine

pytestmark = pytest.mark.differential
STATS = {"policies": 0, "exits": 0, "host": 0, "emulate_writes": 0, "records": 0}
SUMMARY_LINES = []


@pytest.fixture(autouse=True)
def _engine_built():
    require_engine()


def _summary():
    SUMMARY_LINES[:] = [f"engine vs handlers: {STATS['policies']} policies, {STATS['exits']} exits "
                        f"({STATS['host']} host-initiated, {STATS['emulate_writes']} emulate writes, "
                        f"{STATS['records']} audit calls), 0 mismatches"]


@settings(max_examples=2000 if SLOW else 150)
@given(st.data())
def test_engine_equals_python_handlers(data):
    cp = data.draw(policies())
    seq = data.draw(st.lists(exits(cp), min_size=5, max_size=60))
    py_log, c_log = CallLog(), CallLog()
    regs = Registers()
    py = make_handler(cp, py_log, regs)
    eng = Engine(cp)
    rings = [Ring(capacity=64) for _ in range(4)]
    c = make_engine_handler(eng, c_log, rings)
    for index, write, reason, value, vcpu in seq:
        ex = Exit(index, write, value if write else 0, reason, vcpu)
        want = python_reply(py(ex))
        got = python_reply(c(ex))
        assert got == want, (hex(index), write, reason, hex(value))
        for ring in rings:
            deliver(ring.drain(eng.table.rules), c_log)
        assert c_log.calls == py_log.calls
        STATS["exits"] += 1
        v = eng.verdict(index, write, reason, ex.data)
        STATS["host"] += v.host
        STATS["emulate_writes"] += v.action == "emulate" and write
    for index in {i for i, *_ in seq} | set(regs.values):
        assert eng.state.get(index) == regs.values.get(index)
    assert all(r.dropped == 0 for r in rings)
    STATS["policies"] += 1
    STATS["records"] += len(py_log.calls)
    _summary()
