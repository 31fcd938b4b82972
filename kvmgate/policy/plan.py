"""Interval arithmetic for compiling policies: the cost grows with the number of rules, never
with the number of MSRs a range covers (a rule over 0..0xffffffff is one interval).

Everything here works on sorted, disjoint, inclusive [lo, hi] intervals of MSR indices, and
gives exactly what the per-MSR forms would give (msr.model.windows over the points, a bitmap
bit per MSR): the unit tests check that against those forms."""
from __future__ import annotations

import bisect
from typing import Iterable, Iterator

from ..msr.model import MAX_NMSRS, READ, WRITE, MsrRange

Interval = tuple[int, int]


def merge(ivs: Iterable[Interval]) -> list[Interval]:
    """Sorted, disjoint intervals covering the same MSRs (adjacent ones joined)."""
    out: list[list[int]] = []
    for lo, hi in sorted(ivs):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(a, b) for a, b in out]


def clip(ivs: list[Interval], lo: int, hi: int) -> list[Interval]:
    """The parts of sorted disjoint `ivs` inside [lo, hi]."""
    i = max(bisect.bisect_right(ivs, (lo, lo)) - 1, 0)
    out = []
    for a, b in ivs[i:]:
        if a > hi:
            break
        if b >= lo:
            out.append((max(a, lo), min(b, hi)))
    return out


def windows(ivs: list[Interval], width: int = MAX_NMSRS, cap: int | None = None) -> tuple[list[Interval], int]:
    """Greedy windows of at most `width` MSRs covering every MSR of `ivs`, as
    msr.model.windows() gives for the points (each window starts at the first point not yet
    covered and ends at the last point within `width`).  Returns (windows, count): the count is
    exact; the list holds at most `cap` + 1 windows when `cap` is given (enough to know the
    count is over it), so a range over 2^32 MSRs costs nothing."""
    out: list[Interval] = []
    count = 0

    def emit(w: Interval) -> None:
        nonlocal count
        count += 1
        if cap is None or len(out) <= cap:
            out.append(w)

    cur: list[int] | None = None                       # [start, last point covered]
    for a, b in ivs:
        if cur is not None and a - cur[0] < width:
            cur[1] = min(b, cur[0] + width - 1)
            a = cur[1] + 1
        while a <= b:
            if cur is not None:
                emit((cur[0], cur[1]))
            full = (b - a + 1) // width
            if full >= 2:                               # whole windows inside this interval
                skip = full - 1
                if cap is None or len(out) + skip <= cap + 1:
                    for k in range(skip):
                        emit((a + k * width, a + (k + 1) * width - 1))
                else:
                    count += skip
                a += skip * width
            cur = [a, min(b, a + width - 1)]
            a = cur[1] + 1
    if cur is not None:
        emit((cur[0], cur[1]))
    return out, count


def bitmap_range(flags: int, lo: int, hi: int, flip: list[Interval], default_allow: bool) -> MsrRange:
    """A filter range over [lo, hi] whose bit k allows MSR lo + k exactly when it is in `flip`
    (MSRs whose verdict differs from the default) xor the default allows."""
    n = hi - lo + 1
    mask = 0
    for a, b in clip(flip, lo, hi):
        mask |= ((1 << (b - a + 1)) - 1) << (a - lo)
    if default_allow:
        mask ^= (1 << n) - 1
    return MsrRange(flags, lo, n, mask.to_bytes((n + 7) // 8, "little"))


def plan_ranges(exceptions: dict[int, list[Interval]], default_allow: bool, fit: int,
                exact_up_to: int = 4096) -> tuple[list[MsrRange], int, bool]:
    """Filter ranges that flip the default for the given MSRs: (ranges, how many, exact).

    `exceptions[READ]` / `[WRITE]`: sorted disjoint intervals of MSRs whose verdict differs from
    the default.  Either one range per window of the union (READ|WRITE where reads and writes
    agree in it, else a READ and a WRITE range) or windows of each direction apart, whichever
    needs fewer.  Ranges are built only when at most `fit` are needed (else the list is empty);
    the count is exact up to `exact_up_to` windows of the union, past that a lower bound (every
    window of the union needs at least one range)."""
    reads, writes = exceptions[READ], exceptions[WRITE]
    uw, n_union = windows(merge(reads + writes), cap=exact_up_to)
    if n_union > exact_up_to:
        return [], n_union, False
    plan = []                                   # (flags, lo, hi, flip) per shared range
    for lo, hi in uw:
        r, w = clip(reads, lo, hi), clip(writes, lo, hi)
        if r == w:
            plan.append((READ | WRITE, lo, hi, reads))
        else:
            if r:
                plan.append((READ, r[0][0], r[-1][1], reads))
            if w:
                plan.append((WRITE, w[0][0], w[-1][1], writes))
    rw, n_reads = windows(reads, cap=fit)
    ww, n_writes = windows(writes, cap=fit)
    if len(plan) > n_reads + n_writes:
        plan = [(READ, lo, hi, reads) for lo, hi in rw] + [(WRITE, lo, hi, writes) for lo, hi in ww]
        n = n_reads + n_writes
    else:
        n = len(plan)
    if n > fit:
        return [], n, True
    return [bitmap_range(f, lo, hi, flip, default_allow) for f, lo, hi, flip in plan], n, True


class ActionTable:
    """User-space actions by (MSR index << 1 | is_write), as a dict is, but a rule over a wide
    range is one entry: short runs are stored per MSR (`points`, one dict lookup on the exit
    path), long ones as sorted spans found by bisection."""

    SHORT = 64

    def __init__(self):
        self.points: dict[int, object] = {}
        self._spans: dict[int, list[tuple[int, int, object]]] = {0: [], 1: []}
        self._starts: dict[int, list[int]] = {0: [], 1: []}

    def add(self, lo: int, hi: int, write: bool, act) -> None:
        if hi - lo < self.SHORT:
            for i in range(lo, hi + 1):
                self.points[i << 1 | write] = act
        else:
            spans = self._spans[int(write)]
            spans.append((lo, hi, act))
            spans.sort(key=lambda s: s[0])
            self._starts[int(write)] = [s[0] for s in spans]

    @property
    def has_spans(self) -> bool:
        return bool(self._spans[0] or self._spans[1])

    def get(self, key: int, default=None):
        act = self.points.get(key)
        if act is not None:
            return act
        spans = self._spans[key & 1]
        if spans:
            index = key >> 1
            i = bisect.bisect_right(self._starts[key & 1], index) - 1
            if i >= 0 and spans[i][1] >= index:
                return spans[i][2]
        return default

    def __getitem__(self, key: int):
        act = self.get(key)
        if act is None:
            raise KeyError(key)
        return act

    def __contains__(self, key: int) -> bool:
        return self.get(key) is not None

    def __bool__(self) -> bool:
        return bool(self.points) or self.has_spans

    def __len__(self) -> int:
        """(MSR, direction) pairs with an action."""
        return len(self.points) + sum(hi - lo + 1 for s in self._spans.values() for lo, hi, _ in s)

    def rows(self) -> Iterator[tuple[int, int, bool, object]]:
        """(first MSR, last MSR, is_write, action), sorted by MSR then direction."""
        items = [(k >> 1, k >> 1, bool(k & 1), a) for k, a in self.points.items()]
        items += [(lo, hi, bool(w), a) for w, s in self._spans.items() for lo, hi, a in s]
        return iter(sorted(items, key=lambda t: (t[0], t[2])))
