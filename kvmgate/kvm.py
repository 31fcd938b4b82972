"""Kvm, Vm and Vcpu: one object per KVM fd type, each owning its fd (and mmaps).

Every ioctl goes through `ioctl()`, which turns kernel failures into `KvmError`.
"""
from __future__ import annotations

import ctypes as C
import errno
import fcntl
import functools
import mmap
import os
import struct
from typing import Iterable

from . import uapi as u
from .errors import KvmError  # noqa: F401  (re-exported: kvm.KvmError)
from .vcpu_exit import INTERRUPTED, Exit, ExitDecoder

_IOCTL_NAMES = {getattr(u, n): n for n in (
    "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_GET_MSR_INDEX_LIST", "KVM_CHECK_EXTENSION",
    "KVM_GET_VCPU_MMAP_SIZE", "KVM_GET_SUPPORTED_CPUID", "KVM_GET_MSR_FEATURE_INDEX_LIST",
    "KVM_CREATE_VCPU", "KVM_SET_USER_MEMORY_REGION", "KVM_SET_TSS_ADDR", "KVM_ENABLE_CAP",
    "KVM_X86_SET_MSR_FILTER", "KVM_RUN", "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS",
    "KVM_SET_SREGS", "KVM_GET_MSRS", "KVM_SET_MSRS", "KVM_SET_CPUID2", "KVM_GET_TSC_KHZ")}

REQUIRED_CAPS = {
    "KVM_CAP_USER_MEMORY": u.KVM_CAP_USER_MEMORY,
    "KVM_CAP_IMMEDIATE_EXIT": u.KVM_CAP_IMMEDIATE_EXIT,
    "KVM_CAP_X86_USER_SPACE_MSR": u.KVM_CAP_X86_USER_SPACE_MSR,
    "KVM_CAP_X86_MSR_FILTER": u.KVM_CAP_X86_MSR_FILTER,
}

_ioctl = fcntl.ioctl
_KVM_RUN = u.KVM_RUN
_SYNC_WORD = struct.Struct("=Q")
_VALID_REGS = u.kvm_run.kvm_valid_regs.offset
_DIRTY_REGS = u.kvm_run.kvm_dirty_regs.offset
_SYNC_REGS = u.kvm_run.s.offset


def ioctl(fd: int, request: int, arg=0, obj: object = None) -> int:
    """The one place kvmgate calls ioctl(2); a failure raises KvmError(errno, name, obj)."""
    try:
        if arg.__class__ is int:
            return _ioctl(fd, request, arg)
        return _ioctl(fd, request, arg, True)
    except OSError as e:
        raise KvmError(e.errno, _IOCTL_NAMES.get(request, f"ioctl {request:#x}"), obj) from None


class _Fd:
    """Owns one fd: context manager, idempotent close()."""
    fd: int = -1

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _check_open(self, what: str) -> None:
        if self.fd < 0:
            raise KvmError(errno.EBADF, what, self, "closed")


class Kvm(_Fd):
    """/dev/kvm: API version and capability checks, VM creation (system ioctls)."""

    def __init__(self, path: str = "/dev/kvm", require: Iterable[str] | None = None):
        """Open `path`, check the API version and the `require`d capabilities (default: all
        of REQUIRED_CAPS), naming any that are missing."""
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError(e.errno, "open", path, f"cannot open {path}: {e.strerror}") from None
        self.path = path
        try:
            version = ioctl(self.fd, u.KVM_GET_API_VERSION, 0, self)
            if version != u.KVM_API_VERSION:
                raise KvmError(errno.ENOTSUP, "KVM_GET_API_VERSION", self,
                               f"API version {version}, kvmgate needs {u.KVM_API_VERSION}")
            missing = [n for n in (REQUIRED_CAPS if require is None else require)
                       if not self.check_extension(REQUIRED_CAPS[n])]
            if missing:
                raise KvmError(errno.ENOTSUP, "KVM_CHECK_EXTENSION", self,
                               "missing capabilities: " + ", ".join(
                                   f"{n} ({REQUIRED_CAPS[n]})" for n in missing))
            self.vcpu_mmap_size = ioctl(self.fd, u.KVM_GET_VCPU_MMAP_SIZE, 0, self)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"<Kvm {self.path} fd={self.fd}>"

    def api_version(self) -> int:
        return ioctl(self.fd, u.KVM_GET_API_VERSION, 0, self)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when absent, else a capability-specific positive value."""
        return ioctl(self.fd, u.KVM_CHECK_EXTENSION, cap, self)

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves/restores for its guests."""
        return self._index_list(u.KVM_GET_MSR_INDEX_LIST)

    def msr_feature_index_list(self) -> list[int]:
        """KVM_GET_MSR_FEATURE_INDEX_LIST: the feature MSRs (read with KVM_GET_MSRS on the
        /dev/kvm fd: what the host can offer, e.g. IA32_ARCH_CAPABILITIES)."""
        return self._index_list(u.KVM_GET_MSR_FEATURE_INDEX_LIST)

    def _index_list(self, request: int) -> list[int]:
        n = 1024
        while True:
            buf = (C.c_uint32 * (n + 1))(n)
            try:
                ioctl(self.fd, request, buf, self)
            except KvmError as e:
                if e.errno == errno.E2BIG and n < 1 << 16:
                    n *= 4
                    continue
                raise
            return list(buf[1:1 + buf[0]])

    def supported_cpuid(self) -> bytes:
        """KVM_GET_SUPPORTED_CPUID: a kvm_cpuid2 blob ready for KVM_SET_CPUID2."""
        n = 256
        while True:
            buf = bytearray(C.sizeof(u.kvm_cpuid2) + n * C.sizeof(u.kvm_cpuid_entry2))
            u.kvm_cpuid2.from_buffer(buf).nent = n
            try:
                ioctl(self.fd, u.KVM_GET_SUPPORTED_CPUID, buf, self)
            except KvmError as e:
                if e.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise
            nent = u.kvm_cpuid2.from_buffer(buf).nent
            return bytes(buf[:C.sizeof(u.kvm_cpuid2) + nent * C.sizeof(u.kvm_cpuid_entry2)])

    def create_vm(self) -> "Vm":
        self._check_open("KVM_CREATE_VM")
        return Vm(self, ioctl(self.fd, u.KVM_CREATE_VM, 0, self))


class Vm(_Fd):
    """A VM fd: memory slots, capabilities, the MSR filter, vCPU creation (VM ioctls)."""

    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd

    def __repr__(self) -> str:
        return f"<Vm fd={self.fd}>"

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, u.KVM_CHECK_EXTENSION, cap, self)

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        region = u.kvm_userspace_memory_region(slot, flags, guest_phys_addr, memory_size,
                                               userspace_addr)
        ioctl(self.fd, u.KVM_SET_USER_MEMORY_REGION, region, self)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM fd."""
        ec = u.kvm_enable_cap(cap=cap, flags=flags)
        for i, a in enumerate(args):
            ec.args[i] = a
        ioctl(self.fd, u.KVM_ENABLE_CAP, ec, self)

    def set_msr_filter(self, raw: "u.kvm_msr_filter") -> None:
        """KVM_X86_SET_MSR_FILTER with a marshalled filter (the kernel copies the bitmaps it
        points to during the call)."""
        ioctl(self.fd, u.KVM_X86_SET_MSR_FILTER, raw, self)

    def create_vcpu(self, vcpu_id: int = 0) -> "Vcpu":
        self._check_open("KVM_CREATE_VCPU")
        return Vcpu(self, vcpu_id, ioctl(self.fd, u.KVM_CREATE_VCPU, vcpu_id, self))


class Vcpu(_Fd):
    """A vCPU fd and its mmap'd kvm_run area (vCPU ioctls).

    `run()` is KVM_RUN returning the decoded exit (kvmgate.vcpu_exit); `run_struct()` copies
    kvm_run into a ctypes struct kvm_run.
    """

    def __init__(self, vm: Vm, vcpu_id: int, fd: int):
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        try:
            self._mm = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            self.close()
            raise KvmError(e.errno, "mmap", self) from None
        self.run_addr = C.addressof(C.c_char.from_buffer(self._mm))
        self._run_view = memoryview(self._mm)
        self._sync_view: memoryview | None = None
        self.exits = ExitDecoder(self._run_view)

    def __repr__(self) -> str:
        return f"<Vcpu {self.id} fd={self.fd}>"

    def close(self) -> None:
        mm = getattr(self, "_mm", None)
        if mm is not None:
            self.exits.release()
            if self._sync_view is not None:
                self._sync_view.release()
            self._run_view.release()
            self._mm = None
            mm.close()
        super().close()

    def run(self) -> Exit:
        """KVM_RUN, then the exit it left in kvm_run (vcpu_exit.Rdmsr, Wrmsr, PortIo, Hlt,
        Other), or vcpu_exit.INTERRUPTED for -EINTR (immediate_exit or a signal).

        The hot path: ioctl(2) with no argument (an int third argument makes CPython try the
        buffer protocols first, several times slower), no allocation for the reused exits."""
        try:
            _ioctl(self.fd, _KVM_RUN)
        except OSError as e:
            if e.errno == errno.EINTR:
                return INTERRUPTED
            raise KvmError(e.errno, "KVM_RUN", self) from None
        return self.exits.decode()

    def set_immediate_exit(self, on: bool = True) -> None:
        """kvm_run.immediate_exit (KVM_CAP_IMMEDIATE_EXIT): KVM_RUN returns -EINTR at once."""
        self.exits.set_immediate_exit(on)

    # KVM_CAP_SYNC_REGS (kernel Documentation/virt/kvm/api.rst, "kvm_valid_regs" and
    # "kvm_sync_regs"; docs/introspection.md §5): register sets carried in kvm_run.s.
    def set_valid_regs(self, mask: int) -> None:
        """kvm_run.kvm_valid_regs = `mask` (KVM_SYNC_X86_* bits): from the next KVM_RUN on, KVM
        copies those register sets into kvm_run.s at every return (0 stops it)."""
        _SYNC_WORD.pack_into(self._run_view, _VALID_REGS, mask)

    def valid_regs(self) -> int:
        return _SYNC_WORD.unpack_from(self._run_view, _VALID_REGS)[0]

    def set_dirty_regs(self, mask: int) -> None:
        """kvm_run.kvm_dirty_regs = `mask`: the next KVM_RUN loads those sets from kvm_run.s
        (as KVM_SET_REGS/KVM_SET_SREGS would) and clears their bits."""
        _SYNC_WORD.pack_into(self._run_view, _DIRTY_REGS, mask)

    def dirty_regs(self) -> int:
        return _SYNC_WORD.unpack_from(self._run_view, _DIRTY_REGS)[0]

    def sync_regs_view(self) -> memoryview:
        """The bytes of struct kvm_sync_regs in kvm_run.s (regs, sregs, events at their uapi
        offsets), read and written in place; valid until close()."""
        if self._sync_view is None:
            self._sync_view = self._run_view[_SYNC_REGS:_SYNC_REGS + C.sizeof(u.kvm_sync_regs)]
        return self._sync_view

    def run_struct(self) -> u.kvm_run:
        """A copy of the kvm_run area as struct kvm_run."""
        return u.kvm_run.from_buffer_copy(self._mm)

    def get_regs(self) -> u.kvm_regs:
        regs = u.kvm_regs()
        ioctl(self.fd, u.KVM_GET_REGS, regs, self)
        return regs

    def set_regs(self, regs: u.kvm_regs) -> None:
        ioctl(self.fd, u.KVM_SET_REGS, regs, self)

    def get_sregs(self) -> u.kvm_sregs:
        sregs = u.kvm_sregs()
        ioctl(self.fd, u.KVM_GET_SREGS, sregs, self)
        return sregs

    def set_sregs(self, sregs: u.kvm_sregs) -> None:
        ioctl(self.fd, u.KVM_SET_SREGS, sregs, self)

    def set_cpuid(self, cpuid2: bytes) -> None:
        ioctl(self.fd, u.KVM_SET_CPUID2, bytearray(cpuid2), self)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS (host-initiated, not filtered); MSRs KVM cannot read are left out."""
        idx = list(indices)
        buf, entries = _msr_buffer(idx)
        n = ioctl(self.fd, u.KVM_GET_MSRS, buf, self)
        return {entries[i].index: entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> int:
        """KVM_SET_MSRS (host-initiated); returns how many were set (stops at the first failure)."""
        buf, entries = _msr_buffer(list(values), list(values.values()))
        return ioctl(self.fd, u.KVM_SET_MSRS, buf, self)

    def host_msr_access(self, index: int, write: bool, value: int = 0) -> int | None:
        """Carry out one guest MSR access host-initiated (KVM_SET_MSRS / KVM_GET_MSRS): the
        value written or read, or None when KVM refused it.  KVM checks host-initiated
        accesses less strictly than the guest's own."""
        if write:
            return value if self.set_msrs({index: value}) == 1 else None
        return self.get_msrs([index]).get(index)

    def tsc_khz(self) -> int:
        return ioctl(self.fd, u.KVM_GET_TSC_KHZ, 0, self)

    def get_vcpu_events(self) -> u.kvm_vcpu_events:
        events = u.kvm_vcpu_events()
        ioctl(self.fd, u.KVM_GET_VCPU_EVENTS, events, self)
        return events

    def set_vcpu_events(self, events: u.kvm_vcpu_events) -> None:
        ioctl(self.fd, u.KVM_SET_VCPU_EVENTS, events, self)


@functools.lru_cache(maxsize=64)
def _msrs_struct(n: int):
    """struct kvm_msrs followed by n struct kvm_msr_entry (built once per size)."""
    class _Msrs(C.Structure):
        _fields_ = [("hdr", u.kvm_msrs), ("entries", u.kvm_msr_entry * n)]
    return _Msrs


def _msr_buffer(indices: list[int], values: list[int] | None = None):
    buf = _msrs_struct(max(1, len(indices)))()
    buf.hdr.nmsrs = len(indices)
    for i, index in enumerate(indices):
        buf.entries[i].index = index
        if values is not None:
            buf.entries[i].data = values[i]
    return buf, buf.entries
