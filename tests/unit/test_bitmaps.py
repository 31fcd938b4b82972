"""kvmgate.msr.bitmaps: the VMX MSR bitmap and SVM MSRPM KVM would program, hand-computed."""
import pytest

from kvmgate.msr import names
from kvmgate.msr.bitmaps import (
    DEFAULT_SVM_PASSTHROUGH, DEFAULT_VMX_PASSTHROUGH, SPEC_CTRL_PASSTHROUGH, SVM_MSRPM_SIZE,
    VMX_BITMAP_SIZE, X2apicMode, passthrough_report, svm_intercepts, svm_msrpm, vmx_intercepts,
    vmx_msr_bitmap,
)
from kvmgate.msr.model import DEFAULT_DENY, NO_FILTER, READ, WRITE, MsrFilter, MsrRange

FS_BASE, GS_BASE, KERNEL_GS_BASE, TSC_AUX = 0xC0000100, 0xC0000101, 0xC0000102, 0xC0000103
EFER, STAR, LSTAR, CSTAR, SYSCALL_MASK = 0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
TSC, SPEC_CTRL, PRED_CMD, FLUSH_CMD = 0x10, 0x48, 0x49, 0x10B
SYSENTER_CS, SYSENTER_ESP, SYSENTER_EIP = 0x174, 0x175, 0x176
BOTH = (READ, WRITE)


def deny(flags, msr):
    """A filter whose one range denies `msr` for `flags`; everything else is allowed."""
    return MsrFilter([MsrRange(flags, msr, 1, b"\x00")])


def word(bitmap, n):
    """64-bit word n of the bitmap, as the kernel's u64 array sees it (little endian)."""
    return int.from_bytes(bitmap[8 * n:8 * n + 8], "little")


def zero_bits(bitmap):
    return sum(8 - bin(b).count("1") for b in bitmap)


# --- VMX --------------------------------------------------------------------------------------

def test_vmx_no_filter_fs_base_read_bit():
    bm = vmx_msr_bitmap(None)
    assert len(bm) == VMX_BITMAP_SIZE
    # reads of 0xc0000000-0xc0001fff start at 0x400; FS_BASE is bit 0x100 -> byte 0x420 bit 0
    assert bm[0x420] & 1 == 0
    # bits 0-2 FS/GS/KERNEL_GS pass, bit 3 TSC_AUX and up exit: 0b1111_1000
    assert bm[0x420] == 0xF8
    assert bm[0xC20] == 0xF8          # the same MSRs' writes, at 0xc00 + 0x20
    assert not vmx_intercepts(bm, FS_BASE, READ)
    assert vmx_intercepts(bm, TSC_AUX, READ)


def test_vmx_filter_denying_fs_base_read():
    bm = vmx_msr_bitmap(deny(READ, FS_BASE))
    assert bm[0x420] == 0xF9          # bit 0 now set
    assert bm[0xC20] == 0xF8          # writes untouched: the range only covers READ
    assert vmx_intercepts(bm, FS_BASE, READ)
    assert not vmx_intercepts(bm, FS_BASE, WRITE)


def test_vmx_low_window_bits():
    bm = vmx_msr_bitmap(NO_FILTER)
    # TSC read: byte 0x10>>3 = 2, bit 0; its write at 0x800 + 2 stays set
    assert bm[0x002] == 0xFE and bm[0x802] == 0xFF
    # SYSENTER_CS/ESP/EIP = 0x174-0x176: byte 0x2e, bits 4-6, reads and writes
    assert bm[0x02E] == 0x8F and bm[0x82E] == 0x8F
    # PRED_CMD (0x49) write only: byte 0x809 bit 1; FLUSH_CMD (0x10b) write: byte 0x821 bit 3
    assert bm[0x009] == 0xFF and bm[0x809] == 0xFD
    assert bm[0x021] == 0xFF and bm[0x821] == 0xF7
    assert zero_bits(bm) == len(DEFAULT_VMX_PASSTHROUGH) == 15


def test_vmx_tsc_only_reads_and_pred_cmd_only_writes():
    bm = vmx_msr_bitmap(None)
    assert not vmx_intercepts(bm, TSC, READ) and vmx_intercepts(bm, TSC, WRITE)
    assert vmx_intercepts(bm, PRED_CMD, READ) and not vmx_intercepts(bm, PRED_CMD, WRITE)
    assert vmx_intercepts(bm, FLUSH_CMD, READ) and not vmx_intercepts(bm, FLUSH_CMD, WRITE)
    for msr in (EFER, STAR, LSTAR, CSTAR, SYSCALL_MASK):   # SVM passes these, VMX does not
        assert all(vmx_intercepts(bm, msr, a) for a in BOTH)


def test_spec_ctrl_once_written():
    assert all(vmx_intercepts(vmx_msr_bitmap(None), SPEC_CTRL, a) for a in BOTH)
    assert all(svm_intercepts(svm_msrpm(None), SPEC_CTRL, a) for a in BOTH)
    bm = vmx_msr_bitmap(None, spec_ctrl_written=True)
    pm = svm_msrpm(None, spec_ctrl_written=True)
    assert bm[0x009] == 0xFE and bm[0x809] == 0xFC   # 0x48: byte 9 bit 0; PRED_CMD bit 1
    assert not any(vmx_intercepts(bm, SPEC_CTRL, a) for a in BOTH)
    assert not any(svm_intercepts(pm, SPEC_CTRL, a) for a in BOTH)
    # the filter is still asked: a denied write traps, the read still passes
    bm = vmx_msr_bitmap(deny(WRITE, SPEC_CTRL), spec_ctrl_written=True)
    assert not vmx_intercepts(bm, SPEC_CTRL, READ) and vmx_intercepts(bm, SPEC_CTRL, WRITE)
    assert SPEC_CTRL_PASSTHROUGH == ((SPEC_CTRL, READ), (SPEC_CTRL, WRITE))


# --- x2APIC on VMX ----------------------------------------------------------------------------

# kvm_lapic_readable_reg_mask() in x2APIC mode, bit n = MSR 0x800 + n:
# ID 2, LVR 3, TPR 8, PPR 0xa, LDR 0xd, SPIV 0xf          -> 0xa50c
# ISR/TMR/IRR 0x10-0x27                                   -> 0xff_ffff_0000
# ESR 0x28, ICR 0x30, LVTT..TMCCT 0x32-0x39, TDCR 0x3e    -> 0x43fd_0100_0000_0000
READABLE = 0x43FD_01FF_FFFF_A50C
TMCCT_BIT = 1 << 0x39


def test_x2apic_word_positions():
    # read word of 0x800-0x83f is 0x800/64 = 32, its write word 32 + 0x800/8 = 288
    bm = vmx_msr_bitmap(None, x2apic=X2apicMode.VIRTUALIZE)
    assert word(bm, 32) == ~(1 << 8) & (2**64 - 1) == 0xFFFF_FFFF_FFFF_FEFF
    assert word(bm, 288) == 0xFFFF_FFFF_FFFF_FEFF


def test_x2apic_apicv_words():
    bm = vmx_msr_bitmap(None, x2apic="apicv")
    read, write = word(bm, 32), word(bm, 288)
    assert read == (~READABLE | TMCCT_BIT) & (2**64 - 1) == 0xBE02_FE00_0000_5AF3
    # writes pass for TPR (bit 8), EOI (bit 0xb) and SELF_IPI (bit 0x3f) only
    assert write == 0x7FFF_FFFF_FFFF_F6FF
    assert vmx_intercepts(bm, 0x839, READ)            # TMCCT is emulated on demand
    assert vmx_intercepts(bm, 0x80B, READ)            # EOI is write-only
    assert not vmx_intercepts(bm, 0x830, READ) and vmx_intercepts(bm, 0x830, WRITE)
    assert vmx_intercepts(bm, 0x82F, READ)            # LVT_CMCI without MCG_CMCI_P


def test_x2apic_apicv_ipiv_and_cmci():
    bm = vmx_msr_bitmap(None, x2apic=X2apicMode.APICV, ipi_virtualization=True, lvt_cmci=True)
    assert word(bm, 32) == 0xBE02_7E00_0000_5AF3      # bit 0x2f (LVT_CMCI) now passes
    assert word(bm, 288) == 0x7FFE_FFFF_FFFF_F6FF     # bit 0x30 (ICR) write passes too


def test_x2apic_off_and_high_registers_always_exit():
    for mode in X2apicMode:
        bm = vmx_msr_bitmap(None, x2apic=mode, ipi_virtualization=True)
        for n in (33, 34, 35, 289, 290, 291):         # 0x840-0x8ff, reads and writes
            assert word(bm, n) == 2**64 - 1
    off = vmx_msr_bitmap(None)
    assert word(off, 32) == word(off, 288) == 2**64 - 1
    # ipi_virtualization only matters with APICv
    assert vmx_msr_bitmap(None, x2apic="virt", ipi_virtualization=True) == \
        vmx_msr_bitmap(None, x2apic="virt")


def test_x2apic_not_subject_to_the_filter():
    deny_all = MsrFilter([MsrRange.all(READ | WRITE, 0x800, 0x100, allow=False)], DEFAULT_DENY)
    assert vmx_msr_bitmap(deny_all, x2apic="apicv")[0x100:0x108] == \
        vmx_msr_bitmap(None, x2apic="apicv")[0x100:0x108]
    assert vmx_msr_bitmap(deny_all, x2apic="apicv")[0x900:0x908] == \
        vmx_msr_bitmap(None, x2apic="apicv")[0x900:0x908]


def test_x2apic_msrs_refused_in_passthrough_list():
    with pytest.raises(ValueError):
        vmx_msr_bitmap(None, [(0x808, READ)])
    with pytest.raises(ValueError):
        svm_msrpm(None, [(0x830, WRITE)])


# --- SVM --------------------------------------------------------------------------------------

def test_svm_bit_formula_lstar_write():
    bit = 1 * 2048 * 8 + 0x82 * 2 + 1               # range 1, offset 0x82, write
    assert bit == 16645 and (bit >> 3, bit & 7) == (0x820, 5)
    pm = svm_msrpm(None)
    assert len(pm) == SVM_MSRPM_SIZE
    # byte 0x820 holds 0xc0000080-83: EFER r/w intercepted (bits 0, 1), STAR/LSTAR/CSTAR pass
    assert pm[0x820] == 0x03
    assert pm[0x821] == 0xFC                          # SYSCALL_MASK passes, 0x85-0x87 do not
    pm = svm_msrpm(deny(WRITE, LSTAR))
    assert pm[0x820] == 0x03 | 1 << 5
    assert svm_intercepts(pm, LSTAR, WRITE) and not svm_intercepts(pm, LSTAR, READ)


def test_svm_low_range_and_counts():
    pm = svm_msrpm(None)
    # SYSENTER_CS/ESP/EIP 0x174-0x176: bits 0x2e8-0x2ed -> byte 0x5d bits 0-5
    assert pm[0x5D] == 0xC0
    # PRED_CMD 0x49 write -> bit 0x93 (byte 0x12 bit 3); FLUSH_CMD 0x10b write -> bit 0x217
    assert pm[0x12] == 0xF7 and pm[0x42] == 0x7F
    # FS/GS/KERNEL_GS 0xc0000100-102 -> byte 0x800 + 0x40, bits 0-5
    assert pm[0x840] == 0xC0
    assert zero_bits(pm) == len(DEFAULT_SVM_PASSTHROUGH) == 22
    assert pm[0x1000:] == b"\xff" * 0x1000            # 0xc0010000 range and the unused tail
    assert svm_intercepts(pm, TSC, READ)               # SVM does not pass TSC reads


def test_svm_third_range_with_explicit_list():
    hwcr = 0xC0010015
    pm = svm_msrpm(None, [(hwcr, READ)])
    bit = 2 * 2048 * 8 + 0x15 * 2
    assert pm[bit >> 3] == 0xFF & ~(1 << (bit & 7))
    assert not svm_intercepts(pm, hwcr, READ) and svm_intercepts(pm, hwcr, WRITE)
    # the VMX bitmap has no window for it: asking to pass it through changes nothing
    assert vmx_msr_bitmap(None, [(hwcr, READ)]) == b"\xff" * VMX_BITMAP_SIZE


# --- both -------------------------------------------------------------------------------------

@pytest.mark.parametrize("msr", [0x2000, 0x40000000, 0x4B564D00, 0x80868010, 0xC0002000,
                                 0xC0012000, 0xFFFFFFFF, -1, 2**40])
def test_outside_windows_always_intercept(msr):
    wish = [(msr, READ), (msr, WRITE)]
    bm, pm = vmx_msr_bitmap(None, wish), svm_msrpm(None, wish)
    for access in BOTH:
        assert vmx_intercepts(bm, msr, access)
        assert svm_intercepts(pm, msr, access)


def test_default_deny_without_kernel_gs_base():
    flt = MsrFilter([MsrRange.all(READ | WRITE, FS_BASE, 2)], DEFAULT_DENY)   # FS, GS only
    bm, pm = vmx_msr_bitmap(flt), svm_msrpm(flt)
    for access in BOTH:
        assert vmx_intercepts(bm, KERNEL_GS_BASE, access)
        assert svm_intercepts(pm, KERNEL_GS_BASE, access)
        assert not vmx_intercepts(bm, FS_BASE, access)
        assert not svm_intercepts(pm, GS_BASE, access)
    assert bm[0x420] == 0xFC and bm[0xC20] == 0xFC
    # default deny: everything else KVM wanted now traps too
    assert vmx_intercepts(bm, TSC, READ) and svm_intercepts(pm, STAR, READ)


def test_everything_starts_intercepted_with_empty_lists():
    assert vmx_msr_bitmap(None, ()) == b"\xff" * VMX_BITMAP_SIZE
    assert svm_msrpm(None, ()) == b"\xff" * SVM_MSRPM_SIZE


def test_bad_arguments():
    bm, pm = vmx_msr_bitmap(None), svm_msrpm(None)
    for access in (0, 3, 4, "read"):
        with pytest.raises(ValueError):
            vmx_intercepts(bm, FS_BASE, access)
        with pytest.raises(ValueError):
            svm_intercepts(pm, FS_BASE, access)
        with pytest.raises(ValueError):
            vmx_msr_bitmap(None, [(FS_BASE, access)])
    with pytest.raises(ValueError):
        vmx_intercepts(pm, FS_BASE, READ)            # an MSRPM is not a VMX bitmap
    with pytest.raises(ValueError):
        svm_intercepts(bm, FS_BASE, READ)
    with pytest.raises(ValueError):
        vmx_msr_bitmap(None, x2apic="bogus")


def test_default_lists_name_the_msrs_the_kernel_names():
    vmx = {names.msr_name(m) for m, _ in DEFAULT_VMX_PASSTHROUGH}
    svm = {names.msr_name(m) for m, _ in DEFAULT_SVM_PASSTHROUGH}
    common = {"IA32_FS_BASE", "IA32_GS_BASE", "IA32_KERNEL_GS_BASE", "IA32_SYSENTER_CS",
              "IA32_SYSENTER_ESP", "IA32_SYSENTER_EIP", "IA32_PRED_CMD", "IA32_FLUSH_CMD"}
    assert vmx == common | {"IA32_TSC"}
    assert svm == common | {"IA32_STAR", "IA32_LSTAR", "IA32_CSTAR", "IA32_FMASK"}
    assert len(set(DEFAULT_VMX_PASSTHROUGH)) == len(DEFAULT_VMX_PASSTHROUGH)
    assert len(set(DEFAULT_SVM_PASSTHROUGH)) == len(DEFAULT_SVM_PASSTHROUGH)


# --- report -----------------------------------------------------------------------------------

def test_passthrough_report_fs_base_read_denied():
    r = passthrough_report(deny(READ, FS_BASE), FS_BASE)
    assert r["msr"] == FS_BASE and r["name"] == "IA32_FS_BASE"
    assert r["read"] == {"filter_allows": False, "vmx": False, "svm": False,
                         "vmx_candidate": True, "svm_candidate": True}
    assert r["write"] == {"filter_allows": True, "vmx": True, "svm": True,
                          "vmx_candidate": True, "svm_candidate": True}


def test_passthrough_report_vendor_differences():
    r = passthrough_report(None, LSTAR)
    assert r["read"]["svm"] and r["write"]["svm"]
    assert not r["read"]["vmx"] and not r["read"]["vmx_candidate"]
    r = passthrough_report(None, TSC)
    assert r["read"]["vmx"] and not r["read"]["svm"] and not r["write"]["vmx"]
    r = passthrough_report(None, 0x4B564D03)
    assert r["name"] == "MSR_KVM_STEAL_TIME"
    assert not any(r[k][v] for k in ("read", "write") for v in ("vmx", "svm"))


def test_passthrough_report_x2apic_and_spec_ctrl():
    r = passthrough_report(None, 0x808, x2apic="apicv")
    assert r["read"]["vmx"] and r["write"]["vmx"] and not r["read"]["svm"]
    r = passthrough_report(None, 0x830, x2apic="apicv", ipi_virtualization=True)
    assert r["write"]["vmx"]
    r = passthrough_report(deny(WRITE, SPEC_CTRL), SPEC_CTRL, spec_ctrl_written=True)
    assert r["read"]["vmx"] and r["read"]["svm"]
    assert not r["write"]["vmx"] and r["write"]["vmx_candidate"] and not r["write"]["filter_allows"]
    r = passthrough_report(None, 0x1234)
    assert r["name"] == "MSR_0x1234"
