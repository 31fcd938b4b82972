"""Pure tests of the filter model: validation order and errno, decision rules, outcome rules."""
import errno

import pytest
from hypothesis import given, strategies as st

from kvmgate import DEFAULT_ALLOW, DEFAULT_DENY, READ, WRITE, FilterError, KvmError, MsrFilter, MsrRange
from kvmgate.msr.model import (EXIT_REASON_FILTER, EXIT_REASON_INVAL, EXIT_REASON_UNKNOWN,
                               MAX_NMSRS, U32, Fate, KernelMsr, outcome)

from ..expected import doc_allows, doc_errno
from ..strategies import edge_indices, filters, u32_near


def err(flt):
    try:
        flt.validate()
    except FilterError as e:
        assert isinstance(e, KvmError)
        return e.errno
    return 0


def test_validation_rules_and_errno():
    ok = MsrRange(READ, 0x10, 8, b"\xff")
    assert err(MsrFilter([ok])) == 0
    assert err(MsrFilter([ok], flags=2)) == errno.EINVAL                      # rule 1
    assert err(MsrFilter([], flags=DEFAULT_DENY)) == errno.EINVAL             # rule 2
    assert err(MsrFilter([MsrRange(0, 0, 0, b"")], flags=DEFAULT_DENY)) == errno.EINVAL
    assert err(MsrFilter([], flags=DEFAULT_ALLOW)) == 0                       # "no filtering"
    assert err(MsrFilter([MsrRange(0xFFFF, 5, 0, b"garbage"), ok])) == 0      # rule 3: skipped
    assert err(MsrFilter([MsrRange(0, 0x10, 1, b"\x01")])) == errno.EINVAL    # rule 4
    assert err(MsrFilter([MsrRange(4, 0x10, 1, b"\x01")])) == errno.EINVAL
    assert err(MsrFilter([MsrRange(READ, 0, MAX_NMSRS, bytes(0x600))])) == 0  # rule 5
    assert err(MsrFilter([MsrRange(READ, 0, MAX_NMSRS + 1, bytes(0x601))])) == errno.EINVAL
    assert err(MsrFilter([MsrRange(READ, 0xFFFFFFF0, 0x100, bytes(32))])) == 0  # rule 6: wrap ok
    assert err(MsrFilter([ok, ok, ok])) == 0                                  # duplicates ok
    # beyond the kernel: unrepresentable or unsafe inputs, also EINVAL
    assert err(MsrFilter([ok] * 17)) == errno.EINVAL
    assert err(MsrFilter([MsrRange(READ, 0x10, 9, b"\xff")])) == errno.EINVAL  # short bitmap
    assert err(MsrFilter([MsrRange(READ, -1, 1, b"\xff")])) == errno.EINVAL
    assert err(MsrFilter([ok], flags=1 << 40)) == errno.EINVAL


def test_error_message_says_what_is_wrong():
    with pytest.raises(FilterError, match=r"range 1: flags 0x4"):
        MsrFilter([MsrRange(READ, 0, 1, b"\x01"), MsrRange(4, 0, 1, b"\x01")]).validate()


def test_x2apic_always_allowed():
    deny_all = MsrFilter([MsrRange.all(READ | WRITE, 0x0, 0x3000, allow=False)], DEFAULT_DENY)
    for i in (0x800, 0x830, 0x8FF):
        assert deny_all.allows(i, READ) and deny_all.allows(i, WRITE)
    assert not deny_all.allows(0x7FF, READ) and not deny_all.allows(0x900, WRITE)


def test_first_range_matching_index_and_type_decides():
    flt = MsrFilter([MsrRange.all(WRITE, 0x10, 1, allow=False),
                     MsrRange.all(READ | WRITE, 0x10, 1, allow=True)], DEFAULT_DENY)
    assert flt.allows(0x10, READ)          # range 0 covers the index but not READ: passed over
    assert not flt.allows(0x10, WRITE)     # range 0 decides writes
    assert not flt.allows(0x11, READ)      # default deny


def test_wrapping_range_covers_nothing():
    flt = MsrFilter([MsrRange.all(READ, 0xFFFFFFF0, 0x20, allow=False)])
    assert flt.allows(0xFFFFFFF0, READ) and flt.allows(0x5, READ)
    flt = MsrFilter([MsrRange.all(READ, 0xFFFFFFF0, 0x10, allow=False)])   # ends exactly at 2^32
    assert flt.allows(0xFFFFFFF5, READ)       # end computed as 0 in 32 bits: covers nothing


def test_bitmap_bit_order():
    flt = MsrFilter([MsrRange(READ, 0x100, 16, bytes([0b00000101, 0b10000000]))], DEFAULT_DENY)
    assert [i - 0x100 for i in range(0x100, 0x110) if flt.allows(i, READ)] == [0, 2, 15]


def test_outcome_rules():
    deny = MsrFilter([MsrRange.all(READ, 0x10, 1, allow=False)])
    assert outcome(deny, 0x10, READ, EXIT_REASON_FILTER).fate is Fate.EXIT
    assert outcome(deny, 0x10, READ, 0).fate is Fate.GP
    # FILTER wins over UNKNOWN and INVAL
    assert outcome(deny, 0x10, READ, 7, KernelMsr.UNKNOWN).reason == EXIT_REASON_FILTER
    none = MsrFilter()
    assert outcome(none, 0x10, READ, 7, KernelMsr.HANDLED).fate is Fate.KERNEL
    assert outcome(none, 0x10, READ, EXIT_REASON_UNKNOWN, KernelMsr.UNKNOWN).reason == EXIT_REASON_UNKNOWN
    assert outcome(none, 0x10, READ, EXIT_REASON_FILTER, KernelMsr.UNKNOWN).fate is Fate.GP
    assert outcome(none, 0x10, READ, 7, KernelMsr.INVALID).reason == EXIT_REASON_INVAL
    # kvm.ignore_msrs swallows UNKNOWN, never FILTER or INVAL
    assert outcome(none, 0x10, READ, 7, KernelMsr.UNKNOWN, ignore_msrs=True).fate is Fate.IGNORED
    assert outcome(none, 0x10, READ, 7, KernelMsr.INVALID, ignore_msrs=True).fate is Fate.EXIT
    assert outcome(deny, 0x10, READ, 7, KernelMsr.UNKNOWN, ignore_msrs=True).reason == EXIT_REASON_FILTER


@given(st.integers(0, U32), st.integers(1, MAX_NMSRS), u32_near(), st.sampled_from([READ, WRITE]))
def test_allow_all_range_with_default_deny_is_no_filter_inside(base, nmsrs, index, access):
    flt = MsrFilter([MsrRange.all(READ | WRITE, base, nmsrs)], DEFAULT_DENY)
    inside = base <= index < base + nmsrs and base + nmsrs <= U32
    if inside or 0x800 <= index <= 0x8FF:
        assert flt.allows(index, access) == MsrFilter().allows(index, access)
    else:
        assert not flt.allows(index, access)


@given(filters(valid_only=True), st.data())
def test_allows_matches_the_documented_rule(flt, data):
    """docs/kvm-msr.md §3 against a plain second reading of it (tests/expected.py), for every
    range edge, x2APIC and random indices, in the filter's order and in a shuffled order."""
    for candidate in (flt, MsrFilter(data.draw(st.permutations(list(flt.ranges))), flt.flags)):
        for index in edge_indices(candidate) + [0x800, 0x8FF, data.draw(u32_near())]:
            for access in (READ, WRITE):
                assert candidate.allows(index, access) == doc_allows(candidate, index, access), \
                    (hex(index), access, candidate)


@given(filters())
def test_validate_accepts_and_rejects_as_documented(flt):
    """docs/kvm-msr.md §2 (and the extra pre-ioctl checks) against tests/expected.doc_errno;
    the kernel itself is the oracle in tests/differential."""
    assert err(flt) == doc_errno(flt), flt


@pytest.mark.parametrize("flt,why", [
    (MsrFilter([MsrRange(READ, 0x10, 1, b"\x01")], flags=2), "filter flags 0x2"),
    (MsrFilter([MsrRange(READ, 0x10, 1, b"\x01")], flags=3), "filter flags 0x3"),
    (MsrFilter([MsrRange(0, 0x10, 0, b"")] * 3, flags=DEFAULT_DENY), "DEFAULT_DENY with no non-empty range"),
    (MsrFilter([MsrRange(READ, 0x10, 1, b"\x01"), MsrRange(8, 0x10, 1, b"\x01")]), "range 1: flags 0x8"),
    (MsrFilter([MsrRange(0, 0x10, 1, b"\x01")]), "range 0: flags 0"),
    (MsrFilter([MsrRange(READ, 0, MAX_NMSRS + 1, bytes(0x601))]), "range 0: nmsrs 0x3001"),
    (MsrFilter([MsrRange(READ, 0x10, 9, b"\xff")]), "bitmap has 1 bytes"),
    (MsrFilter([MsrRange(READ, 0x10, 1, b"\x01")] * 17), "17 ranges"),
])
def test_validate_rejects_each_bad_filter_with_einval(flt, why):
    with pytest.raises(FilterError, match=why) as ei:
        flt.validate()
    assert ei.value.errno == errno.EINVAL


@given(filters(valid_only=True), st.lists(u32_near(), min_size=1, max_size=8), st.data())
def test_deny_writes_first_changes_only_those_writes(flt, msrs, data):
    from kvmgate.msr.model import deny_writes_first
    try:
        out = deny_writes_first(flt, msrs)
    except FilterError:
        assert len([r for r in flt.ranges if r.nmsrs]) + len(msrs) > 16
        return
    out.validate()
    for index in msrs + edge_indices(flt) + [data.draw(u32_near())]:
        assert out.allows(index, READ) == flt.allows(index, READ)
        if index in msrs and not 0x800 <= index <= 0x8FF:
            assert not out.allows(index, WRITE)
        else:
            assert out.allows(index, WRITE) == flt.allows(index, WRITE)
