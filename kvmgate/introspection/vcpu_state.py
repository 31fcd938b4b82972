"""The state block of a vCPU event, read with as few vCPU ioctls as KVM allows
(docs/introspection.md §3 for the block, §5 for what is read how).

Per MSR event the owner needs the written MSR's old value and the 536-byte state block (mode,
kvm_regs, kvm_sregs, nine MSRs).  On the vCPU's own thread, right after its exit:

* kvm_regs and kvm_sregs come from kvm_run.s (KVM_CAP_SYNC_REGS): once kvm_run.kvm_valid_regs
  has KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS, KVM copies both there at every return from
  KVM_RUN.  The vCPU's thread sets those bits at its first event (read with KVM_GET_REGS and
  KVM_GET_SREGS that time), so every later event reads them with no ioctl.  Without the
  capability: KVM_GET_REGS / KVM_GET_SREGS into buffers made once.
* The MSRs: one KVM_GET_MSRS into a struct kvm_msrs made once per written MSR (the nine state
  MSRs, and the written one when it is not among them).
* The tool's register writes (VCPU_SET_REGISTERS, applied with the event reply) go into
  kvm_run.s.regs with KVM_SYNC_X86_REGS set in kvm_dirty_regs: the vCPU's next KVM_RUN loads
  them, before it completes the WRMSR (as KVM_SET_REGS would).

Every ioctl goes through kvm.ioctl, the one choke point.
"""
from __future__ import annotations

import ctypes as C
import struct

from .. import uapi as u
from ..kvm import ioctl
from .protocol import REGS_SIZE, SREGS_SIZE, STATE_SIZE

__all__ = ["EventState", "STATE_MSR_INDICES", "SYNC_MASK", "mode_of", "vcpu_mode"]

# The 9 MSRs of every vCPU event's state block, in the wire order (protocol.STATE_MSRS).
STATE_MSR_INDICES = (0x174, 0x175, 0x176, 0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083,
                     0x277, 0xC0000102)
SYNC_MASK = u.KVM_SYNC_X86_REGS | u.KVM_SYNC_X86_SREGS

# Offsets in the state block (protocol.STATE: u8 mode, 7 pad, kvm_regs, kvm_sregs, 9 u64).
_REGS_AT = 8
_SREGS_AT = _REGS_AT + REGS_SIZE
_MSRS_AT = _SREGS_AT + SREGS_SIZE
_MSRS = struct.Struct("=9Q")
_NSTATE = len(STATE_MSR_INDICES)
# In kvm_sregs: EFER and the CS descriptor's L and D/B bits (vcpu_mode's inputs).
_EFER = u.kvm_sregs.efer.offset
_CS_L = u.kvm_sregs.cs.offset + u.kvm_segment.l.offset
_CS_DB = u.kvm_sregs.cs.offset + u.kvm_segment.db.offset
_SYNC_SREGS = u.kvm_sync_regs.sregs.offset
_U64 = struct.Struct("=Q")
EFER_LMA = 1 << 10


def mode_of(sregs) -> int:
    """KVMI's mode from raw kvm_sregs bytes: 8 (64-bit code: EFER.LMA and CS.L), 4 (CS.D/B) or
    2 (16-bit code)."""
    if _U64.unpack_from(sregs, _EFER)[0] & EFER_LMA and sregs[_CS_L]:
        return 8
    return 4 if sregs[_CS_DB] else 2


def vcpu_mode(sregs: u.kvm_sregs) -> int:
    """mode_of() for a struct kvm_sregs."""
    return mode_of(bytes(sregs))


class _MsrBuffer:
    """struct kvm_msrs with fixed indexes, for KVM_GET_MSRS again and again."""
    __slots__ = ("buf", "values", "n", "index_of")

    def __init__(self, indices):
        n = len(indices)
        self.n = n
        self.buf = bytearray(C.sizeof(u.kvm_msrs) + n * C.sizeof(u.kvm_msr_entry))
        struct.pack_into("=II", self.buf, 0, n, 0)
        for i, index in enumerate(indices):
            struct.pack_into("=II", self.buf, 8 + 16 * i, index, 0)
        # entry i's data is the u64 at byte 16 + 16 i
        self.values = memoryview(self.buf).cast("Q")[2::2]
        self.index_of = {index: i for i, index in enumerate(indices)}


class EventState:
    """One vCPU's prebuilt buffers and sync-regs state (see the module docstring).  Methods
    that read the exit's registers run on the vCPU's own thread, right after its exit."""

    def __init__(self, vcpu, sync_regs: bool):
        self.vcpu = vcpu
        self.sync_regs = sync_regs          # the host has KVM_CAP_SYNC_REGS
        self._synced = False                # this thread set kvm_valid_regs at an earlier exit
        self.block = bytearray(STATE_SIZE)
        self._block_sregs = memoryview(self.block)[_SREGS_AT:_MSRS_AT]
        self._block_msrs = memoryview(self.block).cast("Q")[_MSRS_AT // 8:]
        self._regs = bytearray(REGS_SIZE)
        self._sregs = bytearray(SREGS_SIZE)
        self._bufs: dict[int, _MsrBuffer] = {}
        self._last: _MsrBuffer | None = None
        self.ioctl_reads = 0                # register reads by ioctl (for tests and the bench)

    # --- MSRs ---------------------------------------------------------------------------------

    def read_msrs(self, msr: int) -> int | None:
        """One KVM_GET_MSRS of the state MSRs and `msr`; `msr`'s value, or None when KVM
        cannot read one of them (then the caller falls back to Vcpu.get_msrs)."""
        b = self._bufs.get(msr)
        if b is None:
            idx = STATE_MSR_INDICES if msr in STATE_MSR_INDICES else STATE_MSR_INDICES + (msr,)
            b = self._bufs[msr] = _MsrBuffer(idx)
        if ioctl(self.vcpu.fd, u.KVM_GET_MSRS, b.buf, self.vcpu) != b.n:
            self._last = None
            return None
        self._last = b
        return b.values[b.index_of[msr]]

    # --- registers ----------------------------------------------------------------------------

    def _synced_now(self) -> bool:
        return self._synced and self.vcpu.valid_regs() & SYNC_MASK == SYNC_MASK

    def fill(self, msrs: dict[int, int] | None = None) -> bytearray:
        """The state block of this exit: registers from kvm_run.s when KVM copied them there,
        else by ioctl (and from then on KVM copies them); MSRs from the last read_msrs(), or
        `msrs` (index -> value, 0 for a missing one)."""
        block, vcpu = self.block, self.vcpu
        if self._synced and vcpu.valid_regs() & SYNC_MASK == SYNC_MASK:
            view = vcpu.sync_regs_view()
            block[_REGS_AT:_SREGS_AT] = view[0:REGS_SIZE]
            block[_SREGS_AT:_MSRS_AT] = view[_SYNC_SREGS:_SYNC_SREGS + SREGS_SIZE]
        else:
            ioctl(vcpu.fd, u.KVM_GET_REGS, self._regs, vcpu)
            ioctl(vcpu.fd, u.KVM_GET_SREGS, self._sregs, vcpu)
            self.ioctl_reads += 1
            block[_REGS_AT:_SREGS_AT] = self._regs
            block[_SREGS_AT:_MSRS_AT] = self._sregs
            if self.sync_regs:
                vcpu.set_valid_regs(vcpu.valid_regs() | SYNC_MASK)
                self._synced = True
        block[0] = mode_of(self._block_sregs)
        if msrs is None and self._last is not None:
            self._block_msrs[:] = self._last.values[:_NSTATE]
        else:
            msrs = msrs or {}
            _MSRS.pack_into(block, _MSRS_AT, *(msrs.get(i, 0) for i in STATE_MSR_INDICES))
        return block

    def set_regs(self, regs: bytes) -> None:
        """Load kvm_regs on the vCPU's own thread, before its next KVM_RUN: through
        kvm_run.s.regs and kvm_dirty_regs when registers are synced, else KVM_SET_REGS."""
        vcpu = self.vcpu
        if self._synced_now():
            vcpu.sync_regs_view()[0:REGS_SIZE] = bytes(regs)[:REGS_SIZE]
            vcpu.set_dirty_regs(vcpu.dirty_regs() | u.KVM_SYNC_X86_REGS)
        else:
            vcpu.set_regs(u.kvm_regs.from_buffer_copy(bytes(regs)[:REGS_SIZE]))
