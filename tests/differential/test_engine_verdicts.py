"""The C engine's replay verdicts (kvmgate.engine.replay_verdict, which trace replay uses) equal
those of the Python exit path's action code (what kvmgate uses without a C compiler), for random
policies, MSRs and every kernel fate; and verdict() is the Python exit path's answer when the C
engine is missing.  Two implementations of the actions, compared: neither is the oracle of
itself."""
import pytest
from hypothesis import given, settings, strategies as st

from kvmgate.engine import replay_verdict, verdict
from kvmgate.engine import binding
from kvmgate.engine.verdict import python_verdict
from kvmgate.msr.model import KernelMsr

from ..conftest import SLOW
from ..engine_policies import exits, policies, require_engine

pytestmark = pytest.mark.differential


@pytest.fixture(autouse=True)
def _engine_built():
    require_engine()


@settings(max_examples=1000 if SLOW else 100)
@given(st.data())
def test_replay_verdict_is_a_drop_in(data):
    cp = data.draw(policies())
    for index, write, _reason, _value, _vcpu in data.draw(st.lists(exits(cp), min_size=1, max_size=15)):
        for kernel in KernelMsr:
            engine = replay_verdict(cp, index, write, kernel, mode="enforce")
            with pytest.MonkeyPatch.context() as m:
                m.setattr(binding, "available", lambda: False)
                python = replay_verdict(cp, index, write, kernel, mode="enforce")
            assert engine == python, (hex(index), write, kernel)


@settings(max_examples=300 if SLOW else 40)
@given(st.data())
def test_without_the_c_engine_verdict_is_the_python_handlers(data):
    cp = data.draw(policies())
    for index, write, reason, value, _vcpu in data.draw(st.lists(exits(cp), min_size=1, max_size=15)):
        want = verdict(cp, index, write, reason, value)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(binding, "available", lambda: False)
            assert verdict(cp, index, write, reason, value) == want == \
                python_verdict(cp, index, write, reason, value)

