"""Hypothesis strategies for random policies and MSR exits (engine tests), and the fakes that
let kvmgate.policy.handlers run without a guest: a machine whose host-initiated accesses and RIPs
are fixed functions of their arguments, and an AuditLog stand-in that lists every call."""
import shutil
import warnings

import pytest
from hypothesis import assume, strategies as st

from kvmgate.engine import available, unavailable_reason
from kvmgate.errors import InjectGP, PolicyError
from kvmgate.policy.compile import compile_policy
from kvmgate.policy import Policy, Rule
from kvmgate.policy.model import FailureRule

U64 = (1 << 64) - 1
CELLS = [0x10, 0x18, 0x35, 0x3A, 0x186, 0x1A0, 0x800, 0x808, 0xC0000080, 0xC0000100,
         0x40000000, 0x4B564D00, 0xFFFFFFF8]
ACTIONS = ["allow", "deny", "ignore", "constant", "emulate"]
REASONS = [4, 4, 4, 2, 1, 0, 8]
VALUES = [0, 1, 5, 0xFF, 0x8000_0000_0000_0000, U64, 0xFFFFFFFF81A00000]

u64s = st.one_of(st.sampled_from(VALUES), st.integers(0, U64))


@st.composite
def rules(draw, lo: int, n: int):
    action = draw(st.sampled_from(ACTIONS))
    kw = {}
    if action == "constant":
        kw = {"value": draw(u64s), "writes": draw(st.sampled_from(["ignore", "gp"]))}
    elif action == "emulate":
        kw = {"initial": draw(u64s),
              "write_mask": draw(st.one_of(st.sampled_from([U64, 0, 0xFF, 0xFFFF0000]), u64s)),
              "allowed": draw(st.one_of(st.none(), st.lists(u64s, max_size=4).map(tuple)))}
    return Rule(lo, lo + n, draw(st.sampled_from([1, 2, 3])), action, draw(st.booleans()),
                f"t.toml:{lo} (rule)", **kw)


@st.composite
def policies(draw):
    """A Policy over disjoint cells of a few MSRs each, compiled (x2APIC rules warn)."""
    cells = draw(st.lists(st.sampled_from(CELLS), unique=True, max_size=6))
    rs = [draw(rules(c, draw(st.integers(0, 5)))) for c in cells]
    failure = st.builds(FailureRule, st.sampled_from(["gp", "ignore"]), st.booleans())
    pol = Policy("t", draw(st.sampled_from(["allow", "deny"])), draw(st.booleans()), rs,
                 draw(failure), draw(failure), x2apic="warn", source="t.toml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return compile_policy(pol)
        except PolicyError:
            assume(False)


@st.composite
def exits(draw, cp):
    """(index, is_write, reason, data, vcpu): mostly exactly the policy's (MSR, direction)s,
    also near them and anywhere."""
    pairs = list(cp.actions.items())
    keys = sorted(k for k, _ in pairs)
    near = sorted({k >> 1 for k in keys} | set(CELLS))
    write = draw(st.booleans())
    index = draw(st.one_of(
        st.builds(lambda i, d: (i + d) & 0xFFFFFFFF, st.sampled_from(near), st.integers(-2, 7)),
        st.integers(0, 0xFFFFFFFF)))
    if keys and draw(st.integers(0, 2)):
        key = draw(st.sampled_from(keys))
        index, write = key >> 1, bool(key & 1)
    values = [v for _, a in pairs for v in (a.initial, a.value, *(a.allowed or ()))]
    data = draw(st.one_of(u64s, st.sampled_from(values or [0]),
                          st.builds(lambda v, b: v ^ (1 << b), st.sampled_from(values or [0]),
                                    st.integers(0, 63))))
    return index, write, draw(st.sampled_from(REASONS)), data, draw(st.integers(0, 3))


def host_access(index: int, write: bool, data: int):
    """The fake host-initiated access: fails for some MSRs, reads a value derived from the index."""
    if index % 5 == 0:
        return None
    return 0 if write else (index * 0x9E3779B97F4A7C15) & U64


def rip_of(vcpu: int) -> int:
    return 0xFFFF_8000_0000_1000 + vcpu * 0x10


class FakeVcpu:
    def __init__(self, n):
        self.n = n

    def host_msr_access(self, index, write, data):
        return host_access(index, write, data)

    def get_regs(self):
        class R:
            rip = rip_of(self.n)
        return R()


class CallLog:
    """AuditLog's interface, listing calls."""

    def __init__(self):
        self.calls = []

    def record(self, **kw):
        self.calls.append(("record", kw))
        return True

    def count(self, index, write, action, result):
        self.calls.append(("count", (index, write, action, result)))


class Exit:
    """An MSR exit made by hand, with the handler context of kvmgate.exits.MsrExit (registers on
    demand, a host-initiated access) answered by a FakeVcpu."""

    def __init__(self, index, is_write, data, reason, vcpu):
        self.index, self.is_write, self.data, self.reason, self.vcpu = index, is_write, data, reason, vcpu
        self._cpu = FakeVcpu(vcpu)

    def regs(self):
        return self._cpu.get_regs()

    def host_access(self, value=None):
        return self._cpu.host_msr_access(self.index, self.is_write, self.data if value is None else value)


def python_reply(reply):
    """A handler's reply as comparable data."""
    return "#GP" if reply is InjectGP else reply


def require_engine():
    """The C engine must be built wherever a C compiler exists (CI installs with pip, which
    builds it); without a compiler the engine tests skip: kvmgate then runs on Python alone."""
    if available():
        return
    if shutil.which("gcc") or shutil.which("cc"):
        pytest.fail(f"{unavailable_reason()}; here: python setup.py build_ext --inplace")
    pytest.skip("no C compiler: the C engine cannot be built here")
