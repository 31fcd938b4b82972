"""ControlledMsrs: VCPU_CONTROL_MSR's one rule (docs/introspection.md, "2. Messages and
commands"), with the apply step a recording stub."""
from kvmgate.introspection import ids
from kvmgate.introspection.controlled import ControlledMsrs

LSTAR, STAR, EFER = 0xC0000082, 0xC0000081, 0xC0000080


def make(denied=(), fail_with=0):
    calls = []

    def apply(adding):
        calls.append((adding, c.union()))
        return fail_with

    c = ControlledMsrs(lambda msr: msr in denied, apply)
    return c, calls


def test_refusals_change_nothing():
    c, calls = make(denied={EFER})
    assert c.control(0, 0x2000, True) == -ids.KVM_EINVAL          # outside the filterable ranges
    assert c.control(0, 0x2000, False) == -ids.KVM_EINVAL
    assert c.control(0, 0x808, True) == -ids.KVM_EOPNOTSUPP       # x2APIC
    assert c.control(0, EFER, True) == -ids.KVM_EPERM             # the owner denies its writes
    assert c.union() == frozenset() and calls == []
    assert c.control(0, 0x808, False) == 0 and calls == []         # disabling: nothing to undo


def test_union_over_vcpus_and_apply_only_on_change():
    c, calls = make()
    assert c.control(0, LSTAR, True) == 0
    assert c.control(1, LSTAR, True) == 0          # per vCPU bookkeeping: the set changed on 1
    assert c.control(1, LSTAR, True) == 0          # no change: apply not called
    assert c.control(1, STAR, True) == 0
    assert [a for a, _ in calls] == [True, True, True]
    assert calls[-1][1] == {LSTAR, STAR}
    assert c.control(0, LSTAR, False) == 0
    assert c.union() == {LSTAR, STAR}              # vCPU 1 still controls LSTAR
    assert c.control(1, LSTAR, False) == 0 and c.control(1, STAR, False) == 0
    assert c.union() == frozenset() and calls[-1] == (False, frozenset())


def test_a_refused_enable_is_rolled_back():
    c, calls = make(fail_with=-ids.KVM_ENOMEM)
    assert c.control(2, LSTAR, True) == -ids.KVM_ENOMEM
    assert calls == [(True, {LSTAR})]              # apply saw the new set ...
    assert c.union() == frozenset()                # ... which was undone after the refusal
    assert c.control(2, LSTAR, False) == 0 and len(calls) == 1
