"""Kernel ABI for x86_64: structures, constants and ioctl numbers, named as in
include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h.  No logic lives here."""
from __future__ import annotations

import ctypes as C
from enum import IntEnum

# include/uapi/asm-generic/ioctl.h
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(dir_: int, type_: int, nr: int, size: int) -> int:
    return (dir_ << 30) | (size << 16) | (type_ << 8) | nr


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, struct) -> int:
    return _IOC(_IOC_READ, type_, nr, C.sizeof(struct))


def _IOW(type_: int, nr: int, struct) -> int:
    return _IOC(_IOC_WRITE, type_, nr, C.sizeof(struct))


def _IOWR(type_: int, nr: int, struct) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, C.sizeof(struct))


KVMIO = 0xAE
KVM_API_VERSION = 12

u8, u16, u32, u64, s32 = C.c_uint8, C.c_uint16, C.c_uint32, C.c_uint64, C.c_int32
U32 = 0xFFFFFFFF             # the one home of the __u32 / __u64 value masks
U64 = 0xFFFFFFFFFFFFFFFF


class kvm_userspace_memory_region(C.Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class kvm_regs(C.Structure):
    _fields_ = [(n, u64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(C.Structure):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
                ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class kvm_dtable(C.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(C.Structure):
    _fields_ = [("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment),
                ("fs", kvm_segment), ("gs", kvm_segment), ("ss", kvm_segment),
                ("tr", kvm_segment), ("ldt", kvm_segment),
                ("gdt", kvm_dtable), ("idt", kvm_dtable),
                ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
                ("efer", u64), ("apic_base", u64),
                ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64))]


class kvm_msr_entry(C.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(C.Structure):
    _fields_ = [("nmsrs", u32), ("pad", u32)]   # followed by struct kvm_msr_entry entries[]


class kvm_msr_list(C.Structure):
    _fields_ = [("nmsrs", u32)]                 # followed by __u32 indices[]


class kvm_cpuid_entry2(C.Structure):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32),
                ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


class kvm_cpuid2(C.Structure):
    _fields_ = [("nent", u32), ("padding", u32)]  # followed by struct kvm_cpuid_entry2 entries[]


class kvm_vcpu_events(C.Structure):
    """struct kvm_vcpu_events (x86, 64 bytes): pending/injected exception, interrupt, NMI."""
    _fields_ = [("exception_injected", u8), ("exception_nr", u8),
                ("exception_has_error_code", u8), ("exception_pending", u8),
                ("exception_error_code", u32),
                ("interrupt", u8 * 4), ("nmi", u8 * 4), ("sipi_vector", u32), ("flags", u32),
                ("smi", u8 * 4), ("triple_fault", u8), ("reserved", u8 * 26),
                ("exception_has_payload", u8), ("exception_payload", u64)]


# struct kvm_sync_regs (x86): the register sets KVM copies to and from kvm_run.s
# (KVM_CAP_SYNC_REGS; kvm_run.kvm_valid_regs / kvm_dirty_regs take KVM_SYNC_X86_* bits)
KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2
KVM_SYNC_X86_VALID_FIELDS = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS


class kvm_sync_regs(C.Structure):
    _fields_ = [("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events)]


class kvm_enable_cap(C.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


KVM_MSR_FILTER_MAX_RANGES = 16
KVM_MSR_FILTER_MAX_BITMAP_SIZE = 0x600
KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1
KVM_MSR_FILTER_RANGE_VALID_MASK = KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE
KVM_MSR_FILTER_DEFAULT_ALLOW = 0 << 0
KVM_MSR_FILTER_DEFAULT_DENY = 1 << 0
KVM_MSR_FILTER_VALID_MASK = KVM_MSR_FILTER_DEFAULT_DENY


class kvm_msr_filter_range(C.Structure):
    _fields_ = [("flags", u32), ("nmsrs", u32), ("base", u32), ("bitmap", C.c_void_p)]


class kvm_msr_filter(C.Structure):
    _fields_ = [("flags", u32), ("ranges", kvm_msr_filter_range * KVM_MSR_FILTER_MAX_RANGES)]


# struct kvm_run and the members of its exit union this project reads
class _kvm_run_hw(C.Structure):
    _fields_ = [("hardware_exit_reason", u64)]


class _kvm_run_fail_entry(C.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _kvm_run_ex(C.Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1


class kvm_run_io(C.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class _kvm_run_mmio(C.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _kvm_run_internal(C.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _kvm_run_system_event(C.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2
KVM_MSR_EXIT_REASON_VALID_MASK = (KVM_MSR_EXIT_REASON_INVAL | KVM_MSR_EXIT_REASON_UNKNOWN
                                  | KVM_MSR_EXIT_REASON_FILTER)


class kvm_run_msr(C.Structure):
    _fields_ = [("error", u8), ("pad", u8 * 7), ("reason", u32), ("index", u32), ("data", u64)]


class _kvm_run_exit(C.Union):
    _fields_ = [("hw", _kvm_run_hw), ("fail_entry", _kvm_run_fail_entry), ("ex", _kvm_run_ex),
                ("io", kvm_run_io), ("mmio", _kvm_run_mmio), ("internal", _kvm_run_internal),
                ("system_event", _kvm_run_system_event), ("msr", kvm_run_msr),
                ("padding", C.c_char * 256)]


class kvm_run(C.Structure):
    _anonymous_ = ("u",)
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
                ("flags", u16), ("cr8", u64), ("apic_base", u64),
                ("u", _kvm_run_exit),
                ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64),
                ("s", C.c_char * 2048)]


# exit reasons (KVM_EXIT_*), also as module names (u.KVM_EXIT_HLT)
class ExitReason(IntEnum):
    KVM_EXIT_UNKNOWN = 0
    KVM_EXIT_EXCEPTION = 1
    KVM_EXIT_IO = 2
    KVM_EXIT_HYPERCALL = 3
    KVM_EXIT_DEBUG = 4
    KVM_EXIT_HLT = 5
    KVM_EXIT_MMIO = 6
    KVM_EXIT_IRQ_WINDOW_OPEN = 7
    KVM_EXIT_SHUTDOWN = 8
    KVM_EXIT_FAIL_ENTRY = 9
    KVM_EXIT_INTR = 10
    KVM_EXIT_SET_TPR = 11
    KVM_EXIT_TPR_ACCESS = 12
    KVM_EXIT_NMI = 16
    KVM_EXIT_INTERNAL_ERROR = 17
    KVM_EXIT_SYSTEM_EVENT = 24
    KVM_EXIT_IOAPIC_EOI = 26
    KVM_EXIT_HYPERV = 27
    KVM_EXIT_X86_RDMSR = 29
    KVM_EXIT_X86_WRMSR = 30
    KVM_EXIT_DIRTY_RING_FULL = 31
    KVM_EXIT_AP_RESET_HOLD = 32
    KVM_EXIT_X86_BUS_LOCK = 33
    KVM_EXIT_XEN = 34
    KVM_EXIT_NOTIFY = 37
    KVM_EXIT_MEMORY_FAULT = 39


KVM_EXIT_UNKNOWN, KVM_EXIT_EXCEPTION, KVM_EXIT_IO, KVM_EXIT_HYPERCALL, KVM_EXIT_DEBUG, \
    KVM_EXIT_HLT, KVM_EXIT_MMIO, KVM_EXIT_IRQ_WINDOW_OPEN, KVM_EXIT_SHUTDOWN, \
    KVM_EXIT_FAIL_ENTRY, KVM_EXIT_INTR, KVM_EXIT_SET_TPR, KVM_EXIT_TPR_ACCESS, KVM_EXIT_NMI, \
    KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_SYSTEM_EVENT, KVM_EXIT_IOAPIC_EOI, KVM_EXIT_HYPERV, \
    KVM_EXIT_X86_RDMSR, KVM_EXIT_X86_WRMSR, KVM_EXIT_DIRTY_RING_FULL, KVM_EXIT_AP_RESET_HOLD, \
    KVM_EXIT_X86_BUS_LOCK, KVM_EXIT_XEN, KVM_EXIT_NOTIFY, KVM_EXIT_MEMORY_FAULT = ExitReason

# capabilities (KVM_CAP_*)
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_SYNC_REGS = 74
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_X86_MSR_FILTER = 189

# system ioctls
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)
KVM_GET_MSR_FEATURE_INDEX_LIST = _IOWR(KVMIO, 0x0A, kvm_msr_list)
# vm ioctls
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, kvm_enable_cap)
KVM_X86_SET_MSR_FILTER = _IOW(KVMIO, 0xC6, kvm_msr_filter)
# vcpu ioctls
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, kvm_msrs)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, kvm_vcpu_events)
KVM_GET_TSC_KHZ = _IO(KVMIO, 0xA3)
