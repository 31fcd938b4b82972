"""Decoded KVM_RUN exits: what `Vcpu.run()` returns (the kvm-ioctls `VcpuExit` pattern).

`ExitDecoder` views one vCPU's kvm_run area (the mmap of the vCPU fd, or any writable buffer of
`sizeof(struct kvm_run)` bytes, so the exit path can be tested on a fake one).  The values
for the hot exits (RDMSR, WRMSR, port I/O, HLT) are made once per vCPU and reused: their
fields read kvm_run when asked (nothing is decoded that nobody reads), answering writes into
kvm_run, and they are valid until the next KVM_RUN.  Offsets come from the uapi structures.

An MSR exit answers itself (docs/kvm-msr.md, "4. Exits to user space"; kernel
Documentation/virt/kvm/api.rst, KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR): `reply(value)`
completes a RDMSR with EDX:EAX = value, `reply()` completes a WRMSR, `fail()` makes KVM inject
#GP (kvm_run.msr.error = 1) on the next KVM_RUN.
"""
from __future__ import annotations

import ctypes as C

from . import uapi as u

_REASON = u.kvm_run.exit_reason.offset // 4                           # u32 words
IMMEDIATE_EXIT = u.kvm_run.immediate_exit.offset                      # byte
_MSR = u.kvm_run.msr.offset
_MSR_ERROR = _MSR + u.kvm_run_msr.error.offset                         # byte
_MSR_REASON = (_MSR + u.kvm_run_msr.reason.offset) // 4               # u32 word
_MSR_INDEX = (_MSR + u.kvm_run_msr.index.offset) // 4                 # u32 word
_MSR_DATA = (_MSR + u.kvm_run_msr.data.offset) // 8                   # u64 word
_IO = u.kvm_run.io.offset
_IO_DIRECTION = _IO + u.kvm_run_io.direction.offset                   # byte
_IO_SIZE = _IO + u.kvm_run_io.size.offset                             # byte
_IO_PORT = (_IO + u.kvm_run_io.port.offset) // 2                      # u16 word
_IO_DATA_OFFSET = (_IO + u.kvm_run_io.data_offset.offset) // 8        # u64 word
U64 = u.U64
_SIZEOF_RUN = C.sizeof(u.kvm_run)


class Exit:
    """Base of every decoded exit; `reason` is the u.ExitReason."""
    __slots__ = ()
    reason: int = -1


class Interrupted(Exit):
    """KVM_RUN returned -EINTR: immediate_exit was set or a signal arrived (an outcome, not an
    error; the caller decides whether to run again)."""
    __slots__ = ()
    reason = u.ExitReason.KVM_EXIT_INTR


INTERRUPTED = Interrupted()


class Hlt(Exit):
    """KVM_EXIT_HLT: the guest executed HLT with interrupts off."""
    __slots__ = ()
    reason = u.ExitReason.KVM_EXIT_HLT


HLT = Hlt()


class MsrRequest(Exit):
    """KVM_EXIT_X86_RDMSR / WRMSR: `index`, `data` (the value written; 0 for reads) and
    `msr_reason` (KVM_MSR_EXIT_REASON_*), answered with reply() or fail()."""
    __slots__ = ("_b", "_w32", "_w64")
    is_write = False

    def __init__(self, b: memoryview, w32: memoryview, w64: memoryview):
        self._b, self._w32, self._w64 = b, w32, w64

    @property
    def index(self) -> int:
        return self._w32[_MSR_INDEX]

    @property
    def data(self) -> int:
        return self._w64[_MSR_DATA]

    @property
    def msr_reason(self) -> int:
        return self._w32[_MSR_REASON]

    def reply(self, value: int | None = None) -> None:
        """Complete the access: a RDMSR returns `value` (EDX:EAX); a WRMSR ignores it."""
        if not self.is_write:
            self._w64[_MSR_DATA] = value & U64
        self._b[_MSR_ERROR] = 0

    def fail(self) -> None:
        """The guest gets #GP for this access."""
        self._b[_MSR_ERROR] = 1


class Rdmsr(MsrRequest):
    __slots__ = ()
    reason = u.ExitReason.KVM_EXIT_X86_RDMSR


class Wrmsr(MsrRequest):
    __slots__ = ()
    reason = u.ExitReason.KVM_EXIT_X86_WRMSR
    is_write = True


class PortIo(Exit):
    """KVM_EXIT_IO (one access, count 1, as kvmgate guests make): `port`, `is_out`, `size`;
    `value` is what an OUT wrote, `answer(value)` what an IN reads."""
    __slots__ = ("_b", "_w16", "_w64")
    reason = u.ExitReason.KVM_EXIT_IO

    def __init__(self, b: memoryview, w16: memoryview, w64: memoryview):
        self._b, self._w16, self._w64 = b, w16, w64

    @property
    def port(self) -> int:
        return self._w16[_IO_PORT]

    @property
    def is_out(self) -> bool:
        return self._b[_IO_DIRECTION] == u.KVM_EXIT_IO_OUT

    @property
    def size(self) -> int:
        return self._b[_IO_SIZE]

    @property
    def value(self) -> int:
        off = self._w64[_IO_DATA_OFFSET]
        return int.from_bytes(self._b[off:off + self.size], "little")

    def answer(self, value: int) -> None:
        size = self.size
        off = self._w64[_IO_DATA_OFFSET]
        self._b[off:off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


class Other(Exit):
    """Any other exit; `run` is a ctypes copy of kvm_run for its details (made per exit: these
    are rare and usually end the run)."""
    __slots__ = ("reason", "run")

    def __init__(self, reason: int, run: u.kvm_run):
        self.reason = reason
        self.run = run

    @property
    def name(self) -> str:
        try:
            return u.ExitReason(self.reason).name
        except ValueError:
            return f"KVM_EXIT_{self.reason}(unknown)"


class ExitDecoder:
    """Decodes the exit in one kvm_run area; `decode()` after each KVM_RUN that returned 0."""
    __slots__ = ("buf", "_w32", "_fixed", "_views")

    def __init__(self, buf: memoryview):
        self.buf = buf
        self._w32 = buf.cast("I")
        w16, w64 = buf.cast("H"), buf.cast("Q")
        self._views = (self._w32, w16, w64)
        self._fixed = {int(u.KVM_EXIT_X86_RDMSR): Rdmsr(buf, self._w32, w64),
                       int(u.KVM_EXIT_X86_WRMSR): Wrmsr(buf, self._w32, w64),
                       int(u.KVM_EXIT_IO): PortIo(buf, w16, w64),
                       int(u.KVM_EXIT_HLT): HLT}

    def decode(self) -> Exit:
        reason = self._w32[_REASON]
        ex = self._fixed.get(reason)
        if ex is None:
            return Other(reason, u.kvm_run.from_buffer_copy(self.buf[:_SIZEOF_RUN]))
        return ex

    def set_immediate_exit(self, on: bool) -> None:
        """kvm_run.immediate_exit: the next KVM_RUN returns -EINTR at once (or the current one
        soon, with a signal to its thread)."""
        self.buf[IMMEDIATE_EXIT] = 1 if on else 0

    def release(self) -> None:
        """Drop the views (before the mapping is unmapped); decode() is unusable after."""
        self._fixed = {}
        for v in self._views:
            v.release()
