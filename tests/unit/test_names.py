"""kvmgate.msr.names: the MSR name table and its lookups."""
import subprocess
import sys
from pathlib import Path

import pytest

from kvmgate.msr import names
from kvmgate.msr.names import MsrInfo, all_msrs, describe, msr_index, msr_info, msr_name, suggest

# Numbers from the Intel SDM vol 4, AMD APM vol 2, and the kernel headers (msr-index.h,
# hvgdk_mini.h, kvm_para.h).
WELL_KNOWN = [
    ("IA32_TSC", 0x10), ("IA32_APIC_BASE", 0x1B), ("IA32_FEATURE_CONTROL", 0x3A),
    ("IA32_SPEC_CTRL", 0x48), ("IA32_PRED_CMD", 0x49), ("IA32_BIOS_SIGN_ID", 0x8B),
    ("IA32_MTRRCAP", 0xFE), ("IA32_SYSENTER_CS", 0x174), ("IA32_SYSENTER_ESP", 0x175),
    ("IA32_SYSENTER_EIP", 0x176), ("IA32_MCG_CAP", 0x179), ("IA32_PERFEVTSEL0", 0x186),
    ("IA32_PMC0", 0xC1), ("IA32_MISC_ENABLE", 0x1A0), ("IA32_MTRR_PHYSBASE0", 0x200),
    ("IA32_MTRR_PHYSMASK9", 0x213), ("IA32_MTRR_FIX64K_00000", 0x250), ("IA32_PAT", 0x277),
    ("IA32_MTRR_DEF_TYPE", 0x2FF), ("IA32_MC0_CTL", 0x400), ("IA32_MC3_MISC", 0x40F),
    ("IA32_VMX_BASIC", 0x480), ("IA32_VMX_EXIT_CTLS2", 0x493), ("IA32_TSC_DEADLINE", 0x6E0),
    ("IA32_PKRS", 0x6E1), ("IA32_XSS", 0xDA0), ("IA32_EFER", 0xC0000080),
    ("IA32_STAR", 0xC0000081), ("IA32_LSTAR", 0xC0000082), ("IA32_CSTAR", 0xC0000083),
    ("IA32_FMASK", 0xC0000084), ("IA32_FS_BASE", 0xC0000100), ("IA32_GS_BASE", 0xC0000101),
    ("IA32_KERNEL_GS_BASE", 0xC0000102), ("IA32_TSC_AUX", 0xC0000103),
    ("IA32_X2APIC_APICID", 0x802), ("IA32_X2APIC_VERSION", 0x803), ("IA32_X2APIC_TPR", 0x808),
    ("IA32_X2APIC_PPR", 0x80A), ("IA32_X2APIC_EOI", 0x80B), ("IA32_X2APIC_LDR", 0x80D),
    ("IA32_X2APIC_SIVR", 0x80F), ("IA32_X2APIC_ISR7", 0x817), ("IA32_X2APIC_TMR0", 0x818),
    ("IA32_X2APIC_IRR7", 0x827), ("IA32_X2APIC_ESR", 0x828), ("IA32_X2APIC_LVT_CMCI", 0x82F),
    ("IA32_X2APIC_ICR", 0x830), ("IA32_X2APIC_INIT_COUNT", 0x838),
    ("IA32_X2APIC_CUR_COUNT", 0x839), ("IA32_X2APIC_DIV_CONF", 0x83E),
    ("IA32_X2APIC_SELF_IPI", 0x83F), ("MSR_CORE_THREAD_COUNT", 0x35),
    ("MSR_PLATFORM_INFO", 0xCE), ("MSR_RAPL_POWER_UNIT", 0x606),
    ("MSR_PKG_ENERGY_STATUS", 0x611), ("MSR_AMD64_SYSCFG", 0xC0010010),
    ("MSR_K7_HWCR", 0xC0010015), ("MSR_VM_CR", 0xC0010114), ("MSR_VM_HSAVE_PA", 0xC0010117),
    ("MSR_KVM_WALL_CLOCK", 0x11), ("MSR_KVM_SYSTEM_TIME", 0x12),
    ("MSR_KVM_WALL_CLOCK_NEW", 0x4B564D00), ("MSR_KVM_SYSTEM_TIME_NEW", 0x4B564D01),
    ("MSR_KVM_ASYNC_PF_EN", 0x4B564D02), ("MSR_KVM_STEAL_TIME", 0x4B564D03),
    ("MSR_KVM_PV_EOI_EN", 0x4B564D04), ("MSR_KVM_POLL_CONTROL", 0x4B564D05),
    ("MSR_KVM_ASYNC_PF_INT", 0x4B564D06), ("MSR_KVM_ASYNC_PF_ACK", 0x4B564D07),
    ("MSR_KVM_MIGRATION_CONTROL", 0x4B564D08), ("HV_X64_MSR_GUEST_OS_ID", 0x40000000),
    ("HV_X64_MSR_HYPERCALL", 0x40000001), ("HV_X64_MSR_VP_INDEX", 0x40000002),
    ("HV_X64_MSR_TIME_REF_COUNT", 0x40000020), ("HV_X64_MSR_REFERENCE_TSC", 0x40000021),
    ("HV_X64_MSR_EOI", 0x40000070), ("HV_X64_MSR_TPR", 0x40000072),
    ("HV_X64_MSR_VP_ASSIST_PAGE", 0x40000073), ("HV_X64_MSR_SCONTROL", 0x40000080),
    ("HV_X64_MSR_SINT15", 0x4000009F), ("HV_X64_MSR_STIMER0_CONFIG", 0x400000B0),
    ("HV_X64_MSR_STIMER3_COUNT", 0x400000B7), ("HV_X64_MSR_CRASH_P0", 0x40000100),
    ("HV_X64_MSR_CRASH_CTL", 0x40000105),
]


@pytest.mark.parametrize("name,index", WELL_KNOWN)
def test_well_known_numbers(name, index):
    assert msr_index(name) == index
    assert msr_name(index) == name


def test_table_loads_sorted_and_unique():
    infos = all_msrs()
    assert len(infos) >= 300
    assert [i.index for i in infos] == sorted(i.index for i in infos)
    assert len({i.index for i in infos}) == len(infos)
    spellings = [n.upper() for i in infos for n in (i.name, *i.aliases)]
    assert len(spellings) == len(set(spellings)), "a name or alias is used for two MSRs"
    assert all(i.group in names.GROUPS for i in infos)
    assert all(isinstance(i, MsrInfo) and i.description for i in infos)


def test_round_trip_every_name_and_alias():
    for info in all_msrs():
        assert msr_name(info.index) == info.name
        assert msr_info(info.index) == info
        for spelled in (info.name, *info.aliases):
            assert msr_index(spelled) == info.index, spelled
            assert msr_index(spelled.lower()) == info.index, spelled
            assert msr_index(f"  {spelled.swapcase()} ") == info.index, spelled


def test_no_derived_spelling_is_ambiguous():
    assert names._table().ambiguous == frozenset()


def test_groups_are_where_they_belong():
    for info in all_msrs():
        if info.group == "x2apic":
            assert 0x800 <= info.index <= 0x8FF
        if info.group == "kvm":
            assert info.index in (0x11, 0x12) or 0x4B564D00 <= info.index <= 0x4B564DFF
        if info.group == "hyperv":
            assert 0x40000000 <= info.index < 0x40001000


@pytest.mark.parametrize("spelled,index", [
    ("MSR_EFER", 0xC0000080), ("EFER", 0xC0000080), ("efer", 0xC0000080),
    ("LSTAR", 0xC0000082), ("lstar", 0xC0000082), ("MSR_LSTAR", 0xC0000082),
    ("MSR_SYSCALL_MASK", 0xC0000084), ("SYSCALL_MASK", 0xC0000084), ("FMASK", 0xC0000084),
    ("msr_ia32_tsc", 0x10), ("TSC", 0x10), ("IA32_TIME_STAMP_COUNTER", 0x10),
    ("MSR_IA32_APICBASE", 0x1B), ("APIC_BASE", 0x1B), ("MSR_IA32_FEAT_CTL", 0x3A),
    ("MSR_IA32_FEATURE_CONTROL", 0x3A), ("MSR_IA32_UCODE_REV", 0x8B),
    ("MSR_AMD64_PATCH_LEVEL", 0x8B), ("PATCH_LEVEL", 0x8B), ("MSR_MTRRcap", 0xFE),
    ("MSR_IA32_CR_PAT", 0x277), ("MSR_MTRRdefType", 0x2FF), ("MSR_FS_BASE", 0xC0000100),
    ("KERNEL_GS_BASE", 0xC0000102), ("MSR_TSC_AUX", 0xC0000103), ("SYSCFG", 0xC0010010),
    ("MSR_K8_SYSCFG", 0xC0010010), ("HWCR", 0xC0010015), ("VM_CR", 0xC0010114),
    ("VM_HSAVE_PA", 0xC0010117), ("X2APIC_TPR", 0x808), ("X2APIC_TMCCT", 0x839),
    ("MSR_IA32_X2APIC_EOI", 0x80B), ("KVM_STEAL_TIME", 0x4B564D03),
    ("hv_x64_msr_vp_index", 0x40000002), ("MSR_IA32_POWER_CTL", 0x1FC),
    ("MSR_POWER_CTL", 0x1FC), ("MSR_IA32_TSC_DEADLINE", 0x6E0),
])
def test_aliases_and_derived_spellings(spelled, index):
    assert msr_index(spelled) == index


def test_explicit_kernel_name_beats_derived_spelling():
    # IA32_PMC<i> is 0xc1+i (SDM) but the kernel's MSR_IA32_PMC0 is the full-width 0x4c1
    assert msr_index("IA32_PMC0") == 0xC1
    assert msr_index("MSR_IA32_PMC0") == 0x4C1
    assert msr_index("MSR_IA32_PMC3") == 0x4C4
    assert msr_index("MSR_IA32_PERFCTR1") == 0xC2


@pytest.mark.parametrize("text,index", [
    ("0x1b", 0x1B), ("0X1B", 0x1B), (" 0x1b ", 0x1B), ("27", 27), ("0", 0), ("010", 10),
    ("0xc0000080", 0xC0000080), ("0xc000_0080", 0xC0000080), ("0xffffffff", 0xFFFFFFFF),
    ("4294967295", 0xFFFFFFFF),
])
def test_numbers(text, index):
    assert msr_index(text) == index


@pytest.mark.parametrize("text", [
    "", "  ", "0x", "-1", "-0x1", "0x100000000", "4294967296", "1e3", "0x1g", "12abc",
    "NO_SUCH_MSR", "IA32_", "MSR_", "0x" + "1" * 40 + "g", None, 27, b"0x1b",
])
def test_unknown_gives_none(text):
    assert msr_index(text) is None


@pytest.mark.parametrize("index", [0x1234, -1, 2**64, 0x4B564DFF, True])
def test_msr_name_unknown(index):
    assert msr_name(index) is None


def test_describe():
    assert describe(0xC0000082) == "IA32_LSTAR"
    assert describe(0x1234) == "MSR_0x1234"
    assert describe(0) == "IA32_P5_MC_ADDR"
    assert describe(-5) == "MSR_-0x5"
    assert describe(2**80) == f"MSR_{2**80:#x}"
    for odd in ("x", None, 1.5, object()):
        assert isinstance(describe(odd), str)


def test_suggest():
    assert suggest("LSATR")[0] == "LSTAR"
    assert "IA32_EFER" in suggest("IA32_EFR")
    assert suggest("ia32_x2apic_tpt")[0] == "IA32_X2APIC_TPR"
    assert suggest("zzzzzzzzzz") == []
    assert suggest("") == [] and suggest(None) == []
    got = suggest("IA32_PMC", n=5)
    assert 0 < len(got) <= 5
    assert len({msr_index(s) for s in got}) == len(got), "one suggestion per MSR"


def test_all_msrs_returns_a_copy():
    first = all_msrs()
    first.clear()
    assert all_msrs()


def test_parse_rejects_bad_tables():
    good = "0x10\tIA32_TSC\tarch\ttsc\n"
    assert names._parse(good).by_index[0x10].name == "IA32_TSC"
    for bad in ["0x10\tIA32_TSC\tarch\n",                                 # too few columns
                "16\tIA32_TSC\tarch\ttsc\n",                              # not 0x hex
                "0x100000000\tBIG\tarch\tbig\n",                          # not u32
                "0x10\tIA32_TSC\tvendorx\ttsc\n",                         # unknown group
                good + "0x10\tOTHER\tarch\tdup index\n",
                good + "0x11\tIA32_TSC\tarch\tdup name\n",
                good + "0x11\tOTHER\tarch\talias clash\tia32_tsc\n",
                "0x10\tIA32 TSC\tarch\tspace in name\n"]:
        with pytest.raises(ValueError):
            names._parse(bad)


def test_ambiguous_derived_spelling_is_dropped():
    table = names._parse("0x1\tIA32_FOO\tarch\ta\n0x2\tMSR_FOO\tintel\tb\n")
    assert "FOO" in table.ambiguous and "FOO" not in table.by_key
    assert table.by_key["MSR_FOO"] == 2 and table.by_key["MSR_IA32_FOO"] == 1


def test_table_is_loaded_lazily():
    code = ("import kvmgate.msr.names as n, kvmgate.msr.bitmaps\n"
            "assert n._table.cache_info().currsize == 0\n"
            "n.msr_index('EFER')\n"
            "assert n._table.cache_info().currsize == 1\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
