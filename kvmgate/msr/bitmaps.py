"""The hardware MSR intercept bitmaps KVM would program for a filter (for `explain`).

Kernel rule (vmx_disable_intercept_for_msr / svm_disable_intercept_for_msr): every MSR starts
intercepted; KVM clears the intercept of a short list of (MSR, access) pairs it chooses, and for
each one first asks kvm_msr_allowed(), so an access the filter denies always exits.  On every
filter change all vCPUs recompute (vmx/svm_recalc_msr_intercepts).  x2APIC MSRs go through the
same question but the filter never denies them (model.MsrFilter.allows).

Nothing here is observable on kvm_pvm hosts; it is what upstream VMX/SVM would program.
"""
from __future__ import annotations

import enum
from typing import Iterable, Iterator

from .model import NO_FILTER, READ, WRITE, X2APIC_FIRST, X2APIC_LAST, MsrFilter
from .names import describe

VMX_BITMAP_SIZE = 4096
SVM_MSRPM_SIZE = 8192

MsrAccess = tuple[int, int]   # (MSR index, READ or WRITE)


def _rw(*msrs: int) -> tuple[MsrAccess, ...]:
    return tuple((m, a) for m in msrs for a in (READ, WRITE))


# Followed: vmx_recalc_msr_intercepts() (Linux 6.17+), which replaced vmx_vcpu_create()'s calls
# over vmx_possible_passthrough_msrs[].  Unconditional ones, plus the PRED_CMD / FLUSH_CMD write
# holes KVM opens when the guest's CPUID has IBPB / L1D_FLUSH.  Left out, pass them explicitly:
# C-state residency and APERF/MPERF reads (only with KVM_X86_DISABLE_EXITS_*), XFD (after the
# first non-zero write), XFD_ERR read, CET, PT, LBR and mediated-PMU MSRs.
DEFAULT_VMX_PASSTHROUGH: tuple[MsrAccess, ...] = (
    (0x10, READ),                                # IA32_TSC
    *_rw(0xC0000100, 0xC0000101, 0xC0000102),    # IA32_FS_BASE, IA32_GS_BASE, IA32_KERNEL_GS_BASE
    *_rw(0x174, 0x175, 0x176),                   # IA32_SYSENTER_CS / _ESP / _EIP
    (0x49, WRITE),                               # IA32_PRED_CMD
    (0x10B, WRITE),                              # IA32_FLUSH_CMD
)

# Followed: svm.c direct_access_msrs[] entries with .always = true (svm_recalc_msr_intercepts()
# in 6.17+), SYSENTER_EIP/ESP (passed through unless the guest's CPUID vendor is
# Intel-compatible), and the PRED_CMD / FLUSH_CMD write holes.  SVM does not pass TSC reads.
DEFAULT_SVM_PASSTHROUGH: tuple[MsrAccess, ...] = (
    *_rw(0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084),   # STAR, LSTAR, CSTAR, SYSCALL_MASK
    *_rw(0xC0000100, 0xC0000101, 0xC0000102),               # FS_BASE, GS_BASE, KERNEL_GS_BASE
    *_rw(0x174, 0x175, 0x176),                              # IA32_SYSENTER_CS / _ESP / _EIP
    (0x49, WRITE),                                          # IA32_PRED_CMD
    (0x10B, WRITE),                                         # IA32_FLUSH_CMD
)

# KVM passes IA32_SPEC_CTRL through both ways once the guest has written a non-zero value
# (VMX and SVM alike; on SVM also from the start when the CPU has V_SPEC_CTRL).
SPEC_CTRL_PASSTHROUGH: tuple[MsrAccess, ...] = _rw(0x48)

_X2APIC_TPR, _X2APIC_EOI, _X2APIC_ICR = 0x808, 0x80B, 0x830
_X2APIC_LVT_CMCI, _X2APIC_TMCCT, _X2APIC_SELF_IPI = 0x82F, 0x839, 0x83F
# kvm_lapic_readable_reg_mask() in x2APIC mode (no ARBPRI, DFR, ICR2): ID, version, TPR, PPR,
# LDR, SIVR, ISR/TMR/IRR 0-7, ESR, ICR, the LVTs, timer initial/current count, divide config.
_X2APIC_READABLE = (0x802, 0x803, 0x808, 0x80A, 0x80D, 0x80F, *range(0x810, 0x828), 0x828,
                    0x830, *range(0x832, 0x83A), 0x83E)


class X2apicMode(enum.Enum):
    """vmx_update_msr_bitmap_x2apic()'s modes."""
    OFF = "off"            # no x2APIC virtualization (guest in xAPIC mode, or no such VMX feature)
    VIRTUALIZE = "virt"    # MSR_BITMAP_MODE_X2APIC: virtualize x2APIC mode, APICv inactive
    APICV = "apicv"        # MSR_BITMAP_MODE_X2APIC | MSR_BITMAP_MODE_X2APIC_APICV


def _check_access(access: int) -> None:
    if access not in (READ, WRITE):
        raise ValueError(f"access {access!r}: must be READ ({READ}) or WRITE ({WRITE})")


def _wishes(passthrough: Iterable[MsrAccess], spec_ctrl_written: bool) -> Iterator[MsrAccess]:
    for msr, access in (*passthrough, *(SPEC_CTRL_PASSTHROUGH if spec_ctrl_written else ())):
        _check_access(access)
        if X2APIC_FIRST <= msr <= X2APIC_LAST:
            raise ValueError(f"{describe(msr)}: x2APIC MSRs follow the x2APIC mode, "
                             "not the pass-through list")
        yield msr, access


def _x2apic_wishes(mode: X2apicMode, ipi_virtualization: bool, lvt_cmci: bool
                   ) -> Iterator[MsrAccess]:
    """vmx_update_msr_bitmap_x2apic(): only 0x800-0x83f are ever passed through."""
    if mode is X2apicMode.OFF:
        return
    yield from _rw(_X2APIC_TPR)   # TPR is virtualized even without virtual interrupt delivery
    if mode is X2apicMode.APICV:
        readable = set(_X2APIC_READABLE)
        if lvt_cmci:              # readable only when the vCPU's MCG_CAP has MCG_CMCI_P
            readable.add(_X2APIC_LVT_CMCI)
        readable.discard(_X2APIC_TMCCT)   # the current timer count is emulated on demand
        yield from ((msr, READ) for msr in sorted(readable))
        yield (_X2APIC_EOI, WRITE)
        yield (_X2APIC_SELF_IPI, WRITE)
        if ipi_virtualization:
            yield from _rw(_X2APIC_ICR)


def _vmx_bit(msr: int, access: int) -> int | None:
    """Bit number in the VMX MSR bitmap, None outside its two 8K-MSR windows."""
    if 0 <= msr <= 0x1FFF:
        byte = 0x000
    elif 0xC0000000 <= msr <= 0xC0001FFF:
        byte = 0x400
    else:
        return None
    if access == WRITE:
        byte += 0x800
    return byte * 8 + (msr & 0x1FFF)


_SVM_RANGES = (0x00000000, 0xC0000000, 0xC0010000)


def _svm_bit(msr: int, access: int) -> int | None:
    """Bit number in the SVM MSRPM (range*2048*8 + offset*2, +1 for write), None outside."""
    for rng, start in enumerate(_SVM_RANGES):
        if start <= msr <= start + 0x1FFF:
            return rng * 2048 * 8 + (msr - start) * 2 + (1 if access == WRITE else 0)
    return None


def _build(size: int, bit_of, flt: MsrFilter | None, wishes: Iterable[MsrAccess]) -> bytes:
    flt = NO_FILTER if flt is None else flt
    bitmap = bytearray(b"\xff" * size)
    for msr, access in wishes:
        bit = bit_of(msr, access)
        if bit is not None and flt.allows(msr, access):
            bitmap[bit >> 3] &= ~(1 << (bit & 7)) & 0xFF
    return bytes(bitmap)


def _intercepts(bitmap: bytes, size: int, bit_of, msr: int, access: int) -> bool:
    _check_access(access)
    if len(bitmap) != size:
        raise ValueError(f"bitmap has {len(bitmap)} bytes, expected {size}")
    bit = bit_of(msr, access)
    return bit is None or (bitmap[bit >> 3] >> (bit & 7)) & 1 == 1


def vmx_msr_bitmap(flt: MsrFilter | None,
                   passthrough: Iterable[MsrAccess] = DEFAULT_VMX_PASSTHROUGH,
                   x2apic: X2apicMode | str = X2apicMode.OFF, *,
                   ipi_virtualization: bool = False, spec_ctrl_written: bool = False,
                   lvt_cmci: bool = False) -> bytes:
    """The 4 KiB VMX MSR bitmap (bit 1 = exit) KVM would program for `flt`.

    Bytes 0x000/0x400 hold reads of 0x0-0x1fff / 0xc0000000-0xc0001fff, 0x800/0xc00 the
    writes.  `ipi_virtualization` (enable_ipiv) and `lvt_cmci` only matter with APICV.
    """
    mode = X2apicMode(x2apic)
    wishes = (*_wishes(passthrough, spec_ctrl_written),
              *_x2apic_wishes(mode, ipi_virtualization, lvt_cmci))
    return _build(VMX_BITMAP_SIZE, _vmx_bit, flt, wishes)


def svm_msrpm(flt: MsrFilter | None,
              passthrough: Iterable[MsrAccess] = DEFAULT_SVM_PASSTHROUGH, *,
              spec_ctrl_written: bool = False) -> bytes:
    """The 8 KiB SVM MSR permission map (2 bits per MSR, 1 = intercept) KVM would program.

    Ranges 0x0, 0xc0000000 and 0xc0010000 (8K MSRs each) at 0x0000, 0x0800, 0x1000; the last
    2 KiB are unused.  AVIC's x2APIC pass-through is not modelled: x2APIC MSRs intercept.
    """
    return _build(SVM_MSRPM_SIZE, _svm_bit, flt, _wishes(passthrough, spec_ctrl_written))


def vmx_intercepts(bitmap: bytes, msr: int, access: int) -> bool:
    """Does this access exit with this VMX MSR bitmap?  MSRs outside its windows always do."""
    return _intercepts(bitmap, VMX_BITMAP_SIZE, _vmx_bit, msr, access)


def svm_intercepts(msrpm: bytes, msr: int, access: int) -> bool:
    """Does this access exit with this SVM MSRPM?  MSRs outside its ranges always do."""
    return _intercepts(msrpm, SVM_MSRPM_SIZE, _svm_bit, msr, access)


def passthrough_report(flt: MsrFilter | None, msr: int, *,
                       x2apic: X2apicMode | str = X2apicMode.OFF,
                       ipi_virtualization: bool = False, spec_ctrl_written: bool = False,
                       lvt_cmci: bool = False,
                       vmx_passthrough: Iterable[MsrAccess] = DEFAULT_VMX_PASSTHROUGH,
                       svm_passthrough: Iterable[MsrAccess] = DEFAULT_SVM_PASSTHROUGH) -> dict:
    """Per access ("read", "write"): would VMX / SVM pass it through (True = no VM exit)?

    Also says whether the filter allows it and whether KVM would pass it through with no
    filter at all ("*_candidate"), so a caller can tell "KVM never passes this through" from
    "the filter made it trap".
    """
    flt = NO_FILTER if flt is None else flt
    vmx_passthrough, svm_passthrough = tuple(vmx_passthrough), tuple(svm_passthrough)
    vmx_opts = dict(x2apic=x2apic, ipi_virtualization=ipi_virtualization,
                    spec_ctrl_written=spec_ctrl_written, lvt_cmci=lvt_cmci)
    vmx = vmx_msr_bitmap(flt, vmx_passthrough, **vmx_opts)
    vmx_any = vmx_msr_bitmap(NO_FILTER, vmx_passthrough, **vmx_opts)
    svm = svm_msrpm(flt, svm_passthrough, spec_ctrl_written=spec_ctrl_written)
    svm_any = svm_msrpm(NO_FILTER, svm_passthrough, spec_ctrl_written=spec_ctrl_written)
    report: dict = {"msr": msr, "name": describe(msr)}
    for access, key in ((READ, "read"), (WRITE, "write")):
        report[key] = {
            "filter_allows": flt.allows(msr, access),
            "vmx": not vmx_intercepts(vmx, msr, access),
            "svm": not svm_intercepts(svm, msr, access),
            "vmx_candidate": not vmx_intercepts(vmx_any, msr, access),
            "svm_candidate": not svm_intercepts(svm_any, msr, access),
        }
    return report
