"""Hypothesis strategies for MSR filters and accesses, shared by model and differential tests."""
import random

from hypothesis import strategies as st

from kvmgate.msr.model import MAX_NMSRS, U32, MsrFilter, MsrRange

INTERESTING = [0x0, 0x10, 0x1B, 0x35, 0x3A, 0x48, 0x8B, 0x10A, 0x174, 0x176, 0x1A0, 0x277, 0x6E0,
               0x7FF, 0x800, 0x801, 0x808, 0x830, 0x83F, 0x8FF, 0x900, 0xDA0, 0x1FFF, 0x2000,
               0x3000, 0x4B564D00, 0x4B564D08, 0x40000000, 0xC0000000, 0xC0000080, 0xC0000082,
               0xC0000100, 0xC0000103, 0xC0001FFF, 0xC0010000, 0xC0010015, 0xFFFFF000,
               0xFFFFFFF0, 0xFFFFFFFF]


def u32_near(points=INTERESTING, spread=0x40):
    return st.one_of(
        st.sampled_from(points),
        st.builds(lambda p, d: (p + d) & U32, st.sampled_from(points), st.integers(-spread, spread)),
        st.integers(0, U32))


@st.composite
def bitmaps(draw, nmsrs: int) -> bytes:
    n = (min(nmsrs, MAX_NMSRS + 64) + 7) // 8
    kind = draw(st.sampled_from(["ones", "zeros", "random", "alternate"]))
    if kind == "ones":
        return b"\xff" * n
    if kind == "zeros":
        return bytes(n)
    if kind == "alternate":
        return b"\xaa" * n
    return random.Random(draw(st.integers(0, 2**32))).randbytes(n)


@st.composite
def ranges(draw, valid_only: bool = False) -> MsrRange:
    flags = draw(st.sampled_from([1, 2, 3]) if valid_only else
                 st.one_of(st.sampled_from([1, 2, 3, 1, 2, 3, 0, 4, 7]), st.integers(0, U32)))
    nmsrs = draw(st.one_of(st.integers(1, 64), st.integers(1, MAX_NMSRS),
                           st.sampled_from([1, 8, 63, 64, 65, 0x2FFF, MAX_NMSRS]))
                 if valid_only else
                 st.one_of(st.integers(0, 64), st.integers(1, MAX_NMSRS),
                           st.sampled_from([0, 1, 8, 63, 64, 65, 0x2FFF, MAX_NMSRS, MAX_NMSRS + 1,
                                            0x4000, U32]), st.integers(0, U32)))
    base = draw(u32_near())
    return MsrRange(flags, base, nmsrs, draw(bitmaps(nmsrs)))


@st.composite
def filters(draw, valid_only: bool = False) -> MsrFilter:
    rs = draw(st.lists(st.one_of(ranges(valid_only),
                                 st.builds(lambda f, b: MsrRange(f, b, 0, b""),
                                           st.integers(0, U32), st.integers(0, U32))),
                       min_size=0 if not valid_only else 1, max_size=16))
    flags = draw(st.sampled_from([0, 1]) if valid_only else
                 st.one_of(st.sampled_from([0, 1, 0, 1, 2, 3]), st.integers(0, U32)))
    if valid_only and flags == 1 and not any(r.nmsrs for r in rs):
        flags = 0
    return MsrFilter(rs, flags)


def edge_indices(flt: MsrFilter) -> list[int]:
    """MSR indices at and around every range edge of `flt`."""
    out = []
    for r in flt.ranges:
        if r.nmsrs:
            end = r.base + r.nmsrs
            out += [(x) & U32 for x in (r.base - 1, r.base, r.base + 1, end - 2, end - 1, end)]
    return out
