"""The kernel's MSR filter rules (KVM_X86_SET_MSR_FILTER, kvm_msr_allowed) and access outcomes.

This module is the single place these rules live: the live handler path, `explain`, learn and
the trace dry-run all ask it.  It is pure: no ioctls, no guest.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Sequence

from ..errors import FilterError
from ..uapi import U32

READ = 1            # KVM_MSR_FILTER_READ
WRITE = 2           # KVM_MSR_FILTER_WRITE
DEFAULT_ALLOW = 0   # KVM_MSR_FILTER_DEFAULT_ALLOW
DEFAULT_DENY = 1    # KVM_MSR_FILTER_DEFAULT_DENY

EXIT_REASON_INVAL = 1    # KVM_MSR_EXIT_REASON_INVAL
EXIT_REASON_UNKNOWN = 2  # KVM_MSR_EXIT_REASON_UNKNOWN
EXIT_REASON_FILTER = 4   # KVM_MSR_EXIT_REASON_FILTER
EXIT_REASON_VALID_MASK = 7

MAX_RANGES = 16           # KVM_MSR_FILTER_MAX_RANGES
MAX_BITMAP_SIZE = 0x600   # KVM_MSR_FILTER_MAX_BITMAP_SIZE (bytes)
MAX_NMSRS = MAX_BITMAP_SIZE * 8
X2APIC_FIRST, X2APIC_LAST = 0x800, 0x8FF

REASON_NAMES = {EXIT_REASON_INVAL: "INVAL", EXIT_REASON_UNKNOWN: "UNKNOWN",
                EXIT_REASON_FILTER: "FILTER"}


def reason_name(reason: int) -> str:
    """Name of an MSR exit reason; never raises on an unknown value."""
    return REASON_NAMES.get(reason, f"reason({reason:#x})" if isinstance(reason, int) else repr(reason))


@dataclass(frozen=True)
class MsrRange:
    """struct kvm_msr_filter_range: bit k of `bitmap` (1 = allow) governs MSR base + k.

    Any u32 values are accepted here; `MsrFilter.validate()` applies the kernel's checks.
    """
    flags: int
    base: int
    nmsrs: int
    bitmap: bytes = b""

    def bit(self, k: int) -> bool:
        """Bit k of the bitmap (byte k/8, bit k%8); bits past the buffer read as 0 (deny)."""
        byte = k >> 3
        return byte < len(self.bitmap) and (self.bitmap[byte] >> (k & 7)) & 1 == 1

    def end(self) -> int:
        """One past the last MSR covered, in the kernel's 32-bit arithmetic (may wrap)."""
        return (self.base + self.nmsrs) & U32

    def covers(self, index: int) -> bool:
        """[base, base+nmsrs) with a 32-bit end: a range that wraps past 2^32 covers nothing."""
        return self.base <= index < self.end()

    @classmethod
    def from_bits(cls, flags: int, base: int, allowed: Sequence[bool]) -> "MsrRange":
        """A range over len(allowed) MSRs from base, bit k set where allowed[k]."""
        buf = bytearray((len(allowed) + 7) // 8)
        for k, ok in enumerate(allowed):
            if ok:
                buf[k >> 3] |= 1 << (k & 7)
        return cls(flags, base, len(allowed), bytes(buf))

    @classmethod
    def all(cls, flags: int, base: int, nmsrs: int, allow: bool = True) -> "MsrRange":
        """A range whose bitmap allows (or denies) every MSR it covers."""
        fill = 0xFF if allow else 0
        return cls(flags, base, nmsrs, bytes([fill]) * ((nmsrs + 7) // 8))


@dataclass(frozen=True)
class MsrFilter:
    """struct kvm_msr_filter: up to 16 ranges, first match per access type, then the default."""
    ranges: Sequence[MsrRange] = field(default_factory=tuple)
    flags: int = DEFAULT_ALLOW

    def __post_init__(self):
        object.__setattr__(self, "ranges", tuple(self.ranges))

    @property
    def default_deny(self) -> bool:
        return bool(self.flags & DEFAULT_DENY)

    def validate(self) -> None:
        """Apply kvm_vm_ioctl_set_msr_filter's checks, in its order; raise FilterError (EINVAL).

        Beyond the kernel: more than 16 ranges cannot be expressed, non-u32 fields cannot be
        marshalled, and a bitmap shorter than ceil(nmsrs/8) bytes would make the kernel read
        foreign memory; all three are rejected with EINVAL too.
        """
        if len(self.ranges) > MAX_RANGES:
            raise FilterError(f"{len(self.ranges)} ranges: the kernel takes at most {MAX_RANGES}")
        _check_u32("filter flags", self.flags)
        if self.flags & ~DEFAULT_DENY:
            raise FilterError(f"filter flags {self.flags:#x}: only DEFAULT_DENY (1) is defined")
        if self.default_deny and not any(r.nmsrs for r in self.ranges):
            raise FilterError("DEFAULT_DENY with no non-empty range: the kernel rejects a "
                              "filter that would deny every MSR")
        for i, r in enumerate(self.ranges):
            if r.nmsrs == 0:
                continue   # skipped unchecked, like the kernel
            where = f"range {i}"
            _check_u32(f"{where} flags", r.flags)
            _check_u32(f"{where} base", r.base)
            _check_u32(f"{where} nmsrs", r.nmsrs)
            if r.flags & ~(READ | WRITE):
                raise FilterError(f"{where}: flags {r.flags:#x} have bits other than READ|WRITE")
            if r.flags == 0:
                raise FilterError(f"{where}: flags 0 (must be READ, WRITE or both)")
            if r.nmsrs > MAX_NMSRS:
                raise FilterError(f"{where}: nmsrs {r.nmsrs:#x} exceeds {MAX_NMSRS:#x} "
                                  f"(bitmap limit of {MAX_BITMAP_SIZE:#x} bytes)")
            need = (r.nmsrs + 7) // 8
            if len(r.bitmap) < need:
                raise FilterError(f"{where}: bitmap has {len(r.bitmap)} bytes, "
                                  f"{r.nmsrs} MSRs need {need}")

    def allows(self, index: int, access: int) -> bool:
        """kvm_msr_allowed(): may the guest's RDMSR (READ) or WRMSR (WRITE) of `index` proceed."""
        if X2APIC_FIRST <= index <= X2APIC_LAST:
            return True
        for r in self.ranges:
            if r.nmsrs and r.flags & access and r.covers(index):
                return r.bit(index - r.base)
        return not self.flags & DEFAULT_DENY

    def deciding_range(self, index: int, access: int) -> int | None:
        """Index of the range whose bit decides this access, or None (x2APIC or the default)."""
        if X2APIC_FIRST <= index <= X2APIC_LAST:
            return None
        for i, r in enumerate(self.ranges):
            if r.nmsrs and r.flags & access and r.covers(index):
                return i
        return None


NO_FILTER = MsrFilter()


def windows(points: list[int], width: int = MAX_NMSRS) -> list[tuple[int, int]]:
    """Fewest [lo, hi] windows of at most `width` MSRs covering sorted points (greedy: optimal)."""
    out: list[tuple[int, int]] = []
    for p in points:
        if out and p - out[-1][0] < width:
            out[-1] = (out[-1][0], p)
        else:
            out.append((p, p))
    return out


def consecutive_runs(points: list[int], width: int | None = None) -> list[tuple[int, int]]:
    """Maximal [first, last] runs of consecutive sorted points (at most `width` long)."""
    runs: list[list[int]] = []
    for p in points:
        if runs and p == runs[-1][1] + 1 and (width is None or p - runs[-1][0] < width):
            runs[-1][1] = p
        else:
            runs.append([p, p])
    return [(a, b) for a, b in runs]


def deny_writes_first(flt: MsrFilter | None, msrs) -> MsrFilter:
    """`flt` with guest writes to `msrs` denied, everything else decided exactly as by `flt`.

    First match per access type: WRITE-only all-zero ranges over exact runs of consecutive
    listed MSRs, placed before flt's ranges, catch those writes and decide nothing else (a
    wider range would decide its other MSRs too).  FilterError past 16 ranges."""
    base = flt if flt is not None else NO_FILTER
    points = sorted({m for m in msrs if not X2APIC_FIRST <= m <= X2APIC_LAST})
    if not points:
        return base
    front = [MsrRange(WRITE, lo, hi - lo + 1, bytes((hi - lo + 8) // 8))
             for lo, hi in consecutive_runs(points, MAX_NMSRS)]
    out = MsrFilter(front + [r for r in base.ranges if r.nmsrs], base.flags)
    if len(out.ranges) > MAX_RANGES:
        raise FilterError(f"intercepting writes needs {len(front)} more ranges; the filter already "
                          f"uses {len(out.ranges) - len(front)} of {MAX_RANGES}")
    return out


def _check_u32(what: str, value: object) -> None:
    if not isinstance(value, int) or not 0 <= value <= U32:
        raise FilterError(f"{what} {value!r} is not a u32")


class KernelMsr(enum.Enum):
    """What KVM's own MSR emulation does with an access that the filter lets through."""
    HANDLED = "handled"   # KVM implements it and the access is valid
    UNKNOWN = "unknown"   # KVM does not implement it (KVM_MSR_EXIT_REASON_UNKNOWN)
    INVALID = "invalid"   # KVM would #GP: reserved bits, read-only, ... (KVM_MSR_EXIT_REASON_INVAL)


class Fate(enum.Enum):
    KERNEL = "kernel"     # completed by KVM, no exit
    IGNORED = "ignored"   # unknown MSR swallowed by kvm.ignore_msrs=Y (reads 0, writes dropped)
    EXIT = "exit"         # KVM_EXIT_X86_RDMSR/WRMSR to user space with `reason`
    GP = "gp"             # the guest gets #GP(0) from KVM


@dataclass(frozen=True)
class Outcome:
    fate: Fate
    reason: int = 0       # the exit reason when the access failed in the kernel, else 0

    def __str__(self) -> str:
        if self.fate is Fate.EXIT:
            return f"exit({reason_name(self.reason)})"
        if self.fate is Fate.GP and self.reason:
            return f"#GP({reason_name(self.reason)})"
        return self.fate.value


def failure_reason(flt: MsrFilter, index: int, access: int, kernel: KernelMsr,
                   ignore_msrs: bool = False) -> int:
    """The KVM_MSR_EXIT_REASON_* an access fails with, or 0 if KVM completes it.

    FILTER is checked first (it wins even for MSRs KVM does not know); then KVM's own
    emulation: UNKNOWN (unless kvm.ignore_msrs swallows it) or INVAL.
    """
    if not flt.allows(index, access):
        return EXIT_REASON_FILTER
    if kernel is KernelMsr.HANDLED:
        return 0
    if kernel is KernelMsr.UNKNOWN:
        return 0 if ignore_msrs else EXIT_REASON_UNKNOWN
    return EXIT_REASON_INVAL


def outcome(flt: MsrFilter, index: int, access: int, exit_mask: int,
            kernel: KernelMsr = KernelMsr.HANDLED, ignore_msrs: bool = False) -> Outcome:
    """Where one guest RDMSR/WRMSR goes (docs/kvm-msr.md §3-§4): kernel, ignored, exit with a reason, or #GP."""
    reason = failure_reason(flt, index, access, kernel, ignore_msrs)
    if reason == 0:
        if kernel is KernelMsr.UNKNOWN and flt.allows(index, access):
            return Outcome(Fate.IGNORED)
        return Outcome(Fate.KERNEL)
    if exit_mask & reason:
        return Outcome(Fate.EXIT, reason)
    return Outcome(Fate.GP, reason)
