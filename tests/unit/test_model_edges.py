"""Edges of the pure MSR model (kvmgate.msr.model) that mutation testing found unguarded, each
checked against a hand-written expectation from docs/kvm-msr.md, not against the model itself:
the x2APIC bounds, interception ranges (deny_writes_first), bitmap bounds, error messages that
name the field, Outcome's text and the kvm.ignore_msrs default."""
import pytest

from kvmgate.errors import FilterError
from kvmgate.msr.model import (DEFAULT_DENY, EXIT_REASON_FILTER, EXIT_REASON_UNKNOWN, READ, WRITE,
                               Fate, KernelMsr, MsrFilter, MsrRange, Outcome, deny_writes_first,
                               failure_reason)

DENY_ALL_RW = MsrFilter([MsrRange(READ | WRITE, 0, 0x2000, bytes(0x400))])   # 0..0x1fff denied


@pytest.mark.parametrize("index, filtered", [(0x7FF, True), (0x800, False), (0x8FF, False),
                                             (0x900, True)])
def test_x2apic_msrs_0x800_to_0x8ff_are_never_filtered(index, filtered):
    # docs/kvm-msr.md: the x2APIC MSRs 0x800-0x8ff are allowed whatever the filter says
    for access in (READ, WRITE):
        assert DENY_ALL_RW.allows(index, access) is (not filtered)
        assert (DENY_ALL_RW.deciding_range(index, access) is not None) is filtered


def test_intercepting_writes_skips_exactly_the_x2apic_msrs():
    out = deny_writes_first(None, [0x7FF, 0x800, 0x8FF, 0x900])
    covered = sorted(m for r in out.ranges for m in range(r.base, r.base + r.nmsrs))
    assert covered == [0x7FF, 0x900]


def test_intercepting_writes_without_a_filter_denies_only_those_writes():
    out = deny_writes_first(None, [0x10, 0x11, 0x13])
    assert [(r.flags, r.base, r.nmsrs, r.bitmap) for r in out.ranges] == \
        [(WRITE, 0x10, 2, b"\x00"), (WRITE, 0x13, 1, b"\x00")]
    assert not out.allows(0x11, WRITE) and out.allows(0x11, READ) and out.allows(0x12, WRITE)
    out.validate()


@pytest.mark.parametrize("n, nbytes", [(1, 1), (8, 1), (9, 2), (16, 2), (17, 3)])
def test_interception_bitmaps_are_exactly_ceil_n_over_8_bytes(n, nbytes):
    (r,) = deny_writes_first(None, range(0x100, 0x100 + n)).ranges
    assert (r.base, r.nmsrs, len(r.bitmap)) == (0x100, n, nbytes)


def test_a_run_longer_than_one_bitmap_is_split_at_the_kernel_maximum():
    # KVM_MSR_FILTER_MAX_BITMAP_SIZE is 0x600 bytes: one range covers at most 0x3000 MSRs
    out = deny_writes_first(None, range(0x10000, 0x10000 + 0x3001))
    assert [(r.base, r.nmsrs) for r in out.ranges] == [(0x10000, 0x3000), (0x13000, 1)]
    out.validate()


def test_intercepting_writes_fills_the_sixteen_ranges_and_refuses_a_seventeenth():
    base = MsrFilter([MsrRange(READ, 0x1000 * i, 1, b"\x01") for i in range(1, 15)])
    out = deny_writes_first(base, [0x10, 0x20])             # 14 + 2 = 16: allowed
    assert len(out.ranges) == 16
    with pytest.raises(FilterError) as e:
        deny_writes_first(base, [0x10, 0x20, 0x30])         # 17
    assert "needs 3 more ranges" in str(e.value) and "uses 14 of 16" in str(e.value)


def test_bits_past_the_bitmap_read_as_deny():
    r = MsrRange(READ, 0, 16, b"\xff")
    assert r.bit(7) is True and r.bit(8) is False and r.bit(15) is False


def test_filter_ranges_are_kept_as_a_tuple():
    f = MsrFilter([MsrRange(READ, 0, 1, b"\x01")])
    assert isinstance(f.ranges, tuple) and hash(f) == hash(MsrFilter([MsrRange(READ, 0, 1, b"\x01")]))


@pytest.mark.parametrize("flt, words", [
    (MsrFilter([], flags=1 << 40), ["filter flags", "u32"]),
    (MsrFilter([MsrRange(1 << 33, 0, 1, b"\x01")]), ["flags", "u32"]),
    (MsrFilter([MsrRange(READ, -1, 1, b"\x01")]), ["base", "u32"]),
    (MsrFilter([MsrRange(READ, 0, 1 << 32, b"\x01")]), ["nmsrs", "u32"]),
    (MsrFilter([], flags=DEFAULT_DENY), ["DEFAULT_DENY", "deny every MSR"]),
])
def test_refusals_name_the_field(flt, words):
    with pytest.raises(FilterError) as e:
        flt.validate()
    for w in words:
        assert w in str(e.value)


def test_outcome_text():
    assert str(Outcome(Fate.KERNEL)) == Fate.KERNEL.value
    assert str(Outcome(Fate.GP)) == Fate.GP.value
    assert str(Outcome(Fate.GP, EXIT_REASON_FILTER)).startswith("#GP(")
    assert str(Outcome(Fate.EXIT, EXIT_REASON_UNKNOWN)).startswith("exit(")
    assert not str(Outcome(Fate.IGNORED, EXIT_REASON_UNKNOWN)).startswith("#GP")


def test_unknown_msrs_fail_unless_ignore_msrs_is_asked_for():
    allow = MsrFilter()
    assert failure_reason(allow, 0x12345678, READ, KernelMsr.UNKNOWN) == EXIT_REASON_UNKNOWN
    assert failure_reason(allow, 0x12345678, READ, KernelMsr.UNKNOWN, ignore_msrs=True) == 0
