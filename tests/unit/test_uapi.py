"""Pin every struct size, field offset and ioctl number against the kernel headers."""
import ctypes as C

import pytest

from kvmgate import uapi as u


@pytest.mark.parametrize("struct,size", [
    (u.kvm_userspace_memory_region, 32), (u.kvm_regs, 144), (u.kvm_segment, 24),
    (u.kvm_dtable, 16), (u.kvm_sregs, 312), (u.kvm_msr_entry, 16), (u.kvm_msrs, 8),
    (u.kvm_msr_list, 4), (u.kvm_cpuid_entry2, 40), (u.kvm_cpuid2, 8), (u.kvm_enable_cap, 104),
    (u.kvm_msr_filter_range, 24), (u.kvm_msr_filter, 0x188), (u.kvm_run, 2352),
    (u._kvm_run_exit, 256), (u.kvm_run_msr, 24), (u.kvm_run_io, 16),
])
def test_struct_sizes(struct, size):
    assert C.sizeof(struct) == size


@pytest.mark.parametrize("struct,field,offset", [
    (u.kvm_msr_filter_range, "flags", 0), (u.kvm_msr_filter_range, "nmsrs", 4),
    (u.kvm_msr_filter_range, "base", 8), (u.kvm_msr_filter_range, "bitmap", 16),
    (u.kvm_msr_filter, "flags", 0), (u.kvm_msr_filter, "ranges", 8),
    (u.kvm_run, "request_interrupt_window", 0), (u.kvm_run, "immediate_exit", 1),
    (u.kvm_run, "exit_reason", 8), (u.kvm_run, "ready_for_interrupt_injection", 12),
    (u.kvm_run, "if_flag", 13), (u.kvm_run, "flags", 14), (u.kvm_run, "cr8", 16),
    (u.kvm_run, "apic_base", 24), (u.kvm_run, "u", 32), (u.kvm_run, "kvm_valid_regs", 288),
    (u.kvm_run, "kvm_dirty_regs", 296), (u.kvm_run, "s", 304),
    (u.kvm_run_msr, "error", 0), (u.kvm_run_msr, "pad", 1), (u.kvm_run_msr, "reason", 8),
    (u.kvm_run_msr, "index", 12), (u.kvm_run_msr, "data", 16),
    (u.kvm_run_io, "direction", 0), (u.kvm_run_io, "size", 1), (u.kvm_run_io, "port", 2),
    (u.kvm_run_io, "count", 4), (u.kvm_run_io, "data_offset", 8),
    (u.kvm_enable_cap, "cap", 0), (u.kvm_enable_cap, "flags", 4), (u.kvm_enable_cap, "args", 8),
    (u.kvm_enable_cap, "pad", 40),
    (u.kvm_userspace_memory_region, "guest_phys_addr", 8),
    (u.kvm_userspace_memory_region, "memory_size", 16),
    (u.kvm_userspace_memory_region, "userspace_addr", 24),
    (u.kvm_regs, "rip", 128), (u.kvm_regs, "rflags", 136), (u.kvm_regs, "r8", 64),
    (u.kvm_segment, "limit", 8), (u.kvm_segment, "selector", 12), (u.kvm_segment, "type", 14),
    (u.kvm_segment, "unusable", 22),
    (u.kvm_sregs, "tr", 144), (u.kvm_sregs, "gdt", 192), (u.kvm_sregs, "idt", 208),
    (u.kvm_sregs, "cr0", 224), (u.kvm_sregs, "cr3", 240), (u.kvm_sregs, "cr4", 248),
    (u.kvm_sregs, "efer", 264), (u.kvm_sregs, "apic_base", 272),
    (u.kvm_sregs, "interrupt_bitmap", 280),
    (u.kvm_msr_entry, "index", 0), (u.kvm_msr_entry, "data", 8),
])
def test_field_offsets(struct, field, offset):
    assert getattr(struct, field).offset == offset


def test_msr_member_of_kvm_run_matches_spec():
    # docs/kvm-msr.md §1: error @32, pad @33, reason @40, index @44, data @48 within kvm_run
    base = u.kvm_run.u.offset
    assert (base + u.kvm_run_msr.error.offset, base + u.kvm_run_msr.reason.offset,
            base + u.kvm_run_msr.index.offset, base + u.kvm_run_msr.data.offset) == (32, 40, 44, 48)


@pytest.mark.parametrize("name,number", [
    ("KVM_GET_API_VERSION", 0xAE00), ("KVM_CREATE_VM", 0xAE01),
    ("KVM_GET_MSR_INDEX_LIST", 0xC004AE02), ("KVM_CHECK_EXTENSION", 0xAE03),
    ("KVM_GET_VCPU_MMAP_SIZE", 0xAE04), ("KVM_GET_SUPPORTED_CPUID", 0xC008AE05),
    ("KVM_CREATE_VCPU", 0xAE41), ("KVM_SET_USER_MEMORY_REGION", 0x4020AE46),
    ("KVM_ENABLE_CAP", 0x4068AEA3), ("KVM_X86_SET_MSR_FILTER", 0x4188AEC6),
    ("KVM_RUN", 0xAE80), ("KVM_GET_REGS", 0x8090AE81), ("KVM_SET_REGS", 0x4090AE82),
    ("KVM_GET_SREGS", 0x8138AE83), ("KVM_SET_SREGS", 0x4138AE84),
    ("KVM_GET_MSRS", 0xC008AE88), ("KVM_SET_MSRS", 0x4008AE89),
    ("KVM_SET_CPUID2", 0x4008AE90), ("KVM_GET_TSC_KHZ", 0xAEA3),
])
def test_ioctl_numbers(name, number):
    assert getattr(u, name) == number


@pytest.mark.parametrize("name,value", [
    ("KVM_CAP_X86_USER_SPACE_MSR", 188), ("KVM_CAP_X86_MSR_FILTER", 189),
    ("KVM_EXIT_X86_RDMSR", 29), ("KVM_EXIT_X86_WRMSR", 30), ("KVM_EXIT_HLT", 5),
    ("KVM_EXIT_IO", 2), ("KVM_MSR_EXIT_REASON_INVAL", 1), ("KVM_MSR_EXIT_REASON_UNKNOWN", 2),
    ("KVM_MSR_EXIT_REASON_FILTER", 4), ("KVM_MSR_FILTER_READ", 1), ("KVM_MSR_FILTER_WRITE", 2),
    ("KVM_MSR_FILTER_DEFAULT_ALLOW", 0), ("KVM_MSR_FILTER_DEFAULT_DENY", 1),
    ("KVM_MSR_FILTER_MAX_RANGES", 16), ("KVM_MSR_FILTER_MAX_BITMAP_SIZE", 0x600),
])
def test_constants(name, value):
    assert getattr(u, name) == value


def test_public_constants_are_the_kernel_values():
    import kvmgate as k
    assert (k.READ, k.WRITE, k.DEFAULT_ALLOW, k.DEFAULT_DENY) == (1, 2, 0, 1)
    assert (k.EXIT_REASON_INVAL, k.EXIT_REASON_UNKNOWN, k.EXIT_REASON_FILTER) == (1, 2, 4)


def test_exit_names_never_raise():
    from kvmgate.exits import exit_name, exception_name
    assert exit_name(29) == "KVM_EXIT_X86_RDMSR"
    assert "unknown" in exit_name(12345)
    assert exit_name(None)
    assert exit_name("x")
    assert exception_name(13) == "#GP" and exception_name(99)
