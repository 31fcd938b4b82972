"""Small pieces of the filter model against hand-written answers: range planning helpers,
whole-range bitmaps, and the outcome of accesses KVM itself fails (docs/kvm-msr.md §3-§4)."""
from kvmgate.msr.model import (DEFAULT_ALLOW, EXIT_REASON_FILTER, EXIT_REASON_UNKNOWN, READ, WRITE,
                               Fate, KernelMsr, MsrFilter, MsrRange, consecutive_runs, outcome,
                               windows)


def test_windows_are_at_most_width_wide():
    assert windows([]) == []
    assert windows([5]) == [(5, 5)]
    assert windows([0, 0x2FFF, 0x3000]) == [(0, 0x2FFF), (0x3000, 0x3000)]
    assert windows([0x10, 0x20, 0x2F, 0x30, 0x40], width=0x20) == [(0x10, 0x2F), (0x30, 0x40)]
    assert windows([100, 103, 104, 200], width=5) == [(100, 104), (200, 200)]


def test_consecutive_runs():
    assert consecutive_runs([]) == []
    assert consecutive_runs([1, 2, 3, 5, 6, 9]) == [(1, 3), (5, 6), (9, 9)]
    assert consecutive_runs([1, 3, 5]) == [(1, 1), (3, 3), (5, 5)]
    assert consecutive_runs([4, 5, 6, 7, 8], width=2) == [(4, 5), (6, 7), (8, 8)]
    assert consecutive_runs([4, 5, 6], width=3) == [(4, 6)]
    assert consecutive_runs(list(range(10, 20)), width=None) == [(10, 19)]


def test_range_all_bitmap_sizes():
    assert MsrRange.all(READ, 0, 8).bitmap == b"\xff"
    assert MsrRange.all(READ, 0, 9).bitmap == b"\xff\xff"
    assert MsrRange.all(WRITE, 0, 1, allow=False).bitmap == b"\x00"


DENY_10 = MsrFilter([MsrRange.all(READ | WRITE, 0x10, 1, allow=False)], DEFAULT_ALLOW)


def test_outcome_of_kernel_failures_outside_the_ranges():
    o = outcome(DENY_10, 0x11, READ, 7, KernelMsr.UNKNOWN)
    assert (o.fate, o.reason, str(o)) == (Fate.EXIT, EXIT_REASON_UNKNOWN, "exit(UNKNOWN)")
    o = outcome(DENY_10, 0x11, WRITE, 0, KernelMsr.UNKNOWN)
    assert (o.fate, o.reason, str(o)) == (Fate.GP, EXIT_REASON_UNKNOWN, "#GP(UNKNOWN)")
    o = outcome(DENY_10, 0x11, WRITE, 7, KernelMsr.UNKNOWN, ignore_msrs=True)
    assert o.fate is Fate.IGNORED


def test_outcome_gp_keeps_its_reason():
    o = outcome(DENY_10, 0x10, READ, 0)
    assert (o.fate, o.reason, str(o)) == (Fate.GP, EXIT_REASON_FILTER, "#GP(FILTER)")
    assert str(outcome(DENY_10, 0x11, READ, 0)) == "kernel"


def test_deciding_range():
    flt = MsrFilter([MsrRange.all(WRITE, 0x10, 4), MsrRange.all(READ | WRITE, 0x12, 4)], DEFAULT_ALLOW)
    assert [flt.deciding_range(i, READ) for i in (0xF, 0x10, 0x12, 0x15, 0x16)] == [None, None, 1, 1, None]
    assert [flt.deciding_range(i, WRITE) for i in (0x10, 0x13, 0x14)] == [0, 0, 1]
    assert flt.deciding_range(0x830, WRITE) is None
    assert MsrFilter([MsrRange(READ, 0x800, 4, b"\x00")]).deciding_range(0x801, READ) is None
