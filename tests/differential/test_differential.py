"""Differential tests: the model's predictions against the running kernel.

For every random filter: the model's validation errno equals the kernel's; then a guest runs
random accesses (known MSRs, range edges, x2APIC, random indices) under whatever filter is in
force (the new one, or the previous one when the kernel rejected the new one) with a random
exit mask, and each access's fate (kernel / exit with reason / #GP) equals model.outcome().
"""
import errno as E

import pytest
from hypothesis import given, settings, strategies as st

from kvmgate import KvmError, Machine
from kvmgate.machine import marshal_filter
from kvmgate.msr.model import (DEFAULT_ALLOW, EXIT_REASON_VALID_MASK, Fate, FilterError,
                               MsrFilter, MsrRange, READ, WRITE, outcome)
from kvmgate.probe import KEEP, PROGRAM, Access, MsrProber

from ..conftest import SLOW
from ..strategies import INTERESTING, edge_indices, filters, u32_near

pytestmark = pytest.mark.differential
STATS = {"filters": 0, "accepted": 0, "rejected": 0, "accesses": 0, "mismatches": 0}
EXAMPLES = 3000 if SLOW else 400
PRIOR = MsrFilter([MsrRange.all(READ, 0x10, 1, allow=False), MsrRange.all(WRITE, 0xC0000082, 1, allow=False)],
                  DEFAULT_ALLOW)


@pytest.fixture(scope="module")
def prober():
    with Machine(PROGRAM) as m:
        p = MsrProber(m)
        known = sorted(set(m.kvm.msr_index_list()) | set(INTERESTING))
        p.known = [i for i in known if not 0x800 <= i <= 0x8FF or i in (0x802, 0x808, 0x830)]
        yield p


def kernel_errno(m: Machine, flt: MsrFilter) -> int:
    raw, keep = marshal_filter(flt)
    try:
        m.vm.set_msr_filter(raw)
    except KvmError as e:
        return e.errno
    return 0


def model_errno(flt: MsrFilter) -> int:
    try:
        flt.validate()
    except FilterError as e:
        return e.errno
    return 0


def safe_value(index: int, rnd: int) -> int:
    """Values whose writes never wreck the guest: EFER gets its own value or a reserved bit."""
    if index == 0xC0000080:
        return 0x500 if rnd & 1 else 0x100500
    return 0


@st.composite
def accesses(draw, flt, known):
    pool = st.one_of(st.sampled_from(known), st.sampled_from(edge_indices(flt) or known),
                     st.integers(0x800, 0x8FF), u32_near())
    out = []
    for _ in range(draw(st.integers(8, 48))):
        index = draw(pool)
        access = draw(st.sampled_from([READ, WRITE]))
        out.append(Access(index, access, safe_value(index, draw(st.integers(0, 1))) if access == WRITE else 0))
    return out


def representable(flt: MsrFilter) -> bool:
    """The kernel struct holds 16 ranges, u32 fields and word-sized bitmaps we provide."""
    return len(flt.ranges) <= 16 and all(
        r.nmsrs == 0 or len(r.bitmap) >= (min(r.nmsrs, 0x3040) + 7) // 8 for r in flt.ranges)


@settings(max_examples=EXAMPLES)
@given(st.data())
def test_model_agrees_with_kernel(prober, data):
    flt = data.draw(filters(valid_only=data.draw(st.sampled_from([True, True, True, False]))))
    if not representable(flt):
        return
    m = prober.machine
    acc = data.draw(accesses(flt, prober.known))
    mask = data.draw(st.integers(0, EXIT_REASON_VALID_MASK))
    kinds = prober.classify(acc)                       # KVM's own verdict, no filter
    m.set_msr_filter(PRIOR)
    k_err, m_err = kernel_errno(m, flt), model_errno(flt)
    STATS["filters"] += 1
    assert k_err == m_err, f"validation: kernel errno {k_err}, model {m_err} for {flt}"
    in_force = flt if k_err == 0 else PRIOR
    STATS["accepted" if k_err == 0 else "rejected"] += 1
    observed = prober.run(acc, KEEP, mask)
    for a, kind, obs in zip(acc, kinds, observed):
        want = outcome(in_force, a.index, a.access, mask, kind)
        STATS["accesses"] += 1
        got_fate = {"kernel": Fate.KERNEL, "exit": Fate.EXIT, "gp": Fate.GP}[obs.fate]
        ok = got_fate is want.fate and (obs.fate != "exit" or obs.reason == want.reason)
        if not ok:
            STATS["mismatches"] += 1
        assert ok, (f"{a} under {in_force} mask {mask} kernel-says {kind}: "
                    f"kernel did {obs}, model predicted {want}")


def test_filter_with_more_than_16_ranges_is_rejected_before_the_kernel(prober):
    with pytest.raises(FilterError) as ei:
        prober.machine.set_msr_filter(MsrFilter([MsrRange.all(READ, i, 1) for i in range(17)]))
    assert ei.value.errno == E.EINVAL


def test_short_bitmap_rejected_although_kernel_would_read_past_it(prober):
    with pytest.raises(FilterError, match="bitmap has 1 bytes"):
        prober.machine.set_msr_filter(MsrFilter([MsrRange(READ, 0x10, 64, b"\xff")]))


def test_bitmaps_are_copied_at_call_time(prober):
    bitmap = bytearray(b"\x00")
    flt = MsrFilter([MsrRange(READ, 0x10, 1, bitmap)])   # MsrRange keeps the caller's buffer
    raw, keep = marshal_filter(flt)
    prober.machine.vm.set_msr_filter(raw)
    bitmap[0] = 1
    for buf in keep:
        buf[0] = 1                                        # even our own buffer: the kernel copied
    obs = prober.run([Access(0x10)], KEEP, 4)
    assert obs[0].fate == "exit" and obs[0].reason == 4
