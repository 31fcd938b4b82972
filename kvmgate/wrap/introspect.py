"""Introspection of a wrapped QEMU VM (`kvmgate wrap --introspect connect:unix:PATH -- qemu ...`).

KVM answers vCPU ioctls only in the process that created the VM (EIO elsewhere), so the vCPU
work of an introspection session is done by the shim inside QEMU, on the vCPU's own thread
while it waits ("parks") in shared memory (csrc/shim_abi.h, struct shim_kvmi_vcpu):

* VCPU_CONTROL_MSR: the controlled MSRs (union over vCPUs) go to the shim's `shim_kvmi.msrs`
  and 'K' on the control pipe; the shim merges one "deny writes" range per MSR into the
  filter it installs (over the policy's and QEMU's own, as `Machine.intercept_msr_writes`
  layers over the owner's) and says "kvmi-filter SEQ ERRNO".  An MSR whose guest writes the
  policy denies gets -KVM_EPERM.
* A guest write to a controlled MSR: the vCPU reads the old value, parks with the event's
  registers (KVM_GET_REGS/SREGS/MSRS): state PARKED and a futex wake.  A per-vCPU thread here,
  started when the shim says "kvmi-run VCPU" (the vCPU's first KVM_RUN), sleeps in FUTEX_WAIT
  on that state word: woken by the park itself (no status line, no hand-off between threads
  of ours), it sends the MSR event through the ordinary `Introspection` server
  (kvmgate.introspection) and writes the answer: CONTINUE stores the tool's value
  (host-initiated KVM_SET_MSRS, in the shim), RETRY keeps the old one, CRASH stops the VMM.
* VM_PAUSE_VCPU: `pause_req` + 'P': the shim's control thread sets kvm_run.immediate_exit and
  sends SIGUSR1 (QEMU's own kick) to the vCPU thread, which parks with KIND_PAUSE; the PAUSE
  event goes out from here.
* While a vCPU is parked, VCPU_GET_REGISTERS is answered from its snapshot (+ KVM_GET_MSRS
  requests the parked thread carries out); on a running vCPU it is -KVM_EAGAIN.  Set
  registers (an event reply's) are loaded by the vCPU before it resumes.
* READ/WRITE_PHYSICAL, GET_CPUID, INJECT_EXCEPTION: not served (-KVM_EOPNOTSUPP / error).
"""
from __future__ import annotations

import ctypes as C
import errno
import logging
import os
import threading
import time
from collections.abc import Sequence

from .. import uapi as u
from ..introspection import ids
from ..introspection.backend import Backend
from ..introspection.controlled import ControlledMsrs
from ..introspection.ids import CONTINUE, CRASH, RETRY
from ..introspection.machine_backend import vcpu_mode
from ..introspection.protocol import REGS_SIZE, pack_state
from ..introspection.vcpu_state import mode_of
from ..msr.model import WRITE
from . import layout

log = logging.getLogger("kvmgate.wrap")

SYS_FUTEX = 202               # x86_64
FUTEX_WAIT, FUTEX_WAKE = 0, 1
FILTER_TIMEOUT = 5.0          # the shim's answer to a new controlled-MSR set
REQUEST_TIMEOUT = 2.0         # a parked vCPU carrying out a request
PAUSE_WAIT = 1.0              # VM_PAUSE_VCPU with wait: at most this long for the vCPU to park
WORKER_POLL = 1.0             # a vCPU worker's FUTEX_WAIT: it looks at close() this often
_ACTION_CODES = {CONTINUE: 0, RETRY: 1, CRASH: 2}   # SHIM_KVMI_CONTINUE/RETRY/CRASH

_libc = C.CDLL(None, use_errno=True)
_libc.syscall.restype = C.c_long
_SYS_FUTEX, _ZERO, _ALL = C.c_long(SYS_FUTEX), C.c_int(0), C.c_int(2**31 - 1)
_FUTEX_WAIT, _FUTEX_WAKE = C.c_int(FUTEX_WAIT), C.c_int(FUTEX_WAKE)


class _Timespec(C.Structure):
    _fields_ = [("tv_sec", C.c_long), ("tv_nsec", C.c_long)]


def futex_wake(addr: int) -> None:
    _libc.syscall(_SYS_FUTEX, C.c_void_p(addr), _FUTEX_WAKE, _ALL, None, None, _ZERO)


def _timespec(timeout: float) -> _Timespec:
    return _Timespec(int(timeout), int((timeout % 1) * 1e9))


def futex_wait(addr: int, value: int, timeout: float) -> None:
    """Sleep while the u32 at `addr` is `value` (FUTEX_WAIT, shared), at most `timeout` s."""
    futex_wait_ts(addr, value, _timespec(timeout))


def futex_wait_ts(addr: int, value: int, ts: _Timespec) -> None:
    """futex_wait with a prebuilt timeout (a vCPU worker's loop)."""
    _libc.syscall(_SYS_FUTEX, C.c_void_p(addr), _FUTEX_WAIT, C.c_uint(value), C.byref(ts),
                  None, _ZERO)


class WrapBackend(Backend):
    """The introspection `Backend` of a wrapped VM: its vCPU operations are done by the shim
    (see the module docstring).  `wrap` is the running kvmgate.wrap.session.Wrap."""

    def __init__(self, wrap):
        self.wrap = wrap
        self.intro = None
        mem, off = wrap.mem, wrap.plan["kvmi_off"]
        self._base = C.addressof(C.c_char.from_buffer(mem, 0))
        self.ctl = layout.ShimKvmi.from_buffer(mem, off)
        self._slots = [layout.ShimKvmiVcpu.from_buffer(mem, off + (1 + i) * layout.KVMI_STRIDE)
                       for i in range(wrap.plan["max_vcpus"])]
        self._apply_lock = threading.Lock()
        self._controlled = ControlledMsrs(self.owner_denies, lambda adding: self._apply())
        self._installed: frozenset = frozenset()
        self._filter_cv = threading.Condition()
        self._filter_replies: dict[int, int] = {}
        self._workers: dict[int, threading.Thread] = {}
        self._closing = False
        self.msr_events = 0
        self.pause_events = 0

    # --- shared memory ----------------------------------------------------------------------

    def _state_addr(self, vid: int) -> int:
        return C.addressof(self._slots[vid]) + layout.ShimKvmiVcpu.state.offset

    def _set_state(self, vid: int, state: int) -> None:
        self._slots[vid].state = state
        futex_wake(self._state_addr(vid))

    def _parked(self, vid: int) -> bool:
        return self._slots[vid].state in (layout.KVMI_PARKED, layout.KVMI_REQ,
                                          layout.KVMI_REQ_DONE)

    # --- status lines from the shim (Wrap's reader thread) -----------------------------------

    def on_status(self, word: str, rest: str) -> None:
        if word in ("kvmi-run", "kvmi"):        # a vCPU's first run (or park): its worker
            self._start_worker(int(rest.split()[0]))
        elif word == "kvmi-filter":
            seq, err = (int(x) for x in rest.split()[:2])
            with self._filter_cv:
                self._filter_replies[seq] = err
                self._filter_cv.notify_all()

    def _start_worker(self, vid: int) -> None:
        if vid >= len(self._slots) or vid in self._workers or self._closing:
            return
        t = self._workers[vid] = threading.Thread(target=self._vcpu_worker, args=(vid,),
                                                  daemon=True, name=f"kvmgate-kvmi-vcpu{vid}")
        t.start()

    def _vcpu_worker(self, vid: int) -> None:
        """Plays the vCPU thread's part of Machine for a parked QEMU vCPU: sleeps on the slot's
        state word until the vCPU parks (PARKED: after our REPLY the state can only become
        PARKED again through a new park; a request of ours ends in PARKED with a wake too)."""
        slot = self._slots[vid]
        addr, timeout = self._state_addr(vid), _timespec(WORKER_POLL)
        while not self._closing:
            st = slot.state
            if st != layout.KVMI_PARKED:
                futex_wait_ts(addr, st, timeout)
                continue
            try:
                self._serve_park(vid, slot.kind)
            except Exception:
                log.exception("introspection: vCPU %d park failed; the guest's value stands", vid)
                slot.action, slot.value = CONTINUE, slot.new_value
                self._set_state(vid, layout.KVMI_REPLY)

    def _serve_park(self, vid: int, kind: int) -> None:
        slot, intro = self._slots[vid], self.intro
        action, value = CONTINUE, slot.new_value
        if intro is not None and kind == layout.KVMI_KIND_MSR:
            if intro.msr_wanted(vid, slot.msr):
                self.msr_events += ids.msr_write_is_event(slot.old_value, slot.new_value)
                action, value = intro.msr_event(vid, slot.msr, slot.old_value, slot.new_value,
                                                self._state(vid))
        elif intro is not None and kind == layout.KVMI_KIND_PAUSE:
            action = intro.handle_pauses(vid, lambda: self._pause_state(vid))
        slot.action = _ACTION_CODES.get(action, 0)
        slot.value = value & (2**64 - 1)
        self._set_state(vid, layout.KVMI_REPLY)

    def _sregs(self, vid: int):
        return u.kvm_sregs.from_buffer_copy(bytes(self._slots[vid].sregs))

    def _state(self, vid: int) -> bytes:
        s = self._slots[vid]
        sregs = bytes(s.sregs)
        return pack_state(mode_of(sregs), bytes(s.regs), sregs, s.state_msrs)

    def _pause_state(self, vid: int) -> bytes:
        self.pause_events += 1
        return self._state(vid)

    def _request_msrs(self, vid: int, msrs: Sequence[int]) -> dict[int, int]:
        """KVM_GET_MSRS carried out by the parked vCPU."""
        s = self._slots[vid]
        out: dict[int, int] = {}
        for i in range(0, len(msrs), layout.KVMI_REQ_MSRS):
            part = list(msrs[i:i + layout.KVMI_REQ_MSRS])
            s.req, s.req_nmsrs = layout.KVMI_REQ_GET_MSRS, len(part)
            for j, m in enumerate(part):
                s.req_msrs[j] = m
            self._set_state(vid, layout.KVMI_REQ)
            deadline = time.monotonic() + REQUEST_TIMEOUT
            while s.state != layout.KVMI_REQ_DONE:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OSError(ids.KVM_EAGAIN, "the parked vCPU did not answer")
                futex_wait(self._state_addr(vid), s.state, min(left, 0.05))
            got = s.req_result
            self._set_state(vid, layout.KVMI_PARKED)   # back to waiting (wakes the worker)
            if got < 0:
                raise OSError(ids.KVM_EINVAL, f"KVM_GET_MSRS: {os.strerror(-got)}")
            out.update((part[j], s.req_values[j]) for j in range(min(got, len(part))))
        return out

    # --- Backend ----------------------------------------------------------------------------

    def vcpu_count(self) -> int:
        return min(self.wrap.header.vcpus, len(self._slots))

    def read_physical(self, gpa: int, size: int) -> bytes | None:
        return None           # QEMU's guest memory is not mapped here

    def write_physical(self, gpa: int, data: bytes) -> bool:
        return False

    def get_registers(self, vcpu: int, msrs: Sequence[int]):
        if not self._parked(vcpu):
            raise OSError(ids.KVM_EAGAIN, f"vCPU {vcpu} runs in QEMU: registers only while it "
                          "waits for the tool (an event, a pause)")
        s = self._slots[vcpu]
        values = self._request_msrs(vcpu, msrs) if msrs else {}
        missing = [i for i in msrs if i not in values]
        if missing:
            raise OSError(ids.KVM_EINVAL, f"MSR {missing[0]:#x} cannot be read")
        return (vcpu_mode(self._sregs(vcpu)), bytes(s.regs), bytes(s.sregs),
                [(i, values[i]) for i in msrs])

    def set_registers(self, vcpu: int, regs: bytes) -> None:
        s = self._slots[vcpu]
        C.memmove(s.regs, bytes(regs)[:REGS_SIZE], REGS_SIZE)
        s.set_regs = 1

    def tsc_khz(self) -> int | None:
        """KVM_GET_TSC_KHZ as read by the first vCPU that entered KVM_RUN (QEMU gives every
        vCPU the same frequency; the session is hooked at the first vCPU's first run)."""
        return next((s.tsc_khz for s in self._slots[:self.vcpu_count()] if s.tsc_khz), None)

    def owner_denies(self, msr: int) -> bool:
        return not self.wrap.compiled.cp.filter.allows(msr, WRITE)

    def controlled(self) -> frozenset:
        return self._controlled.union()

    def control_msr(self, vcpu: int, msr: int, enable: bool) -> int:
        return self._controlled.control(vcpu, msr, enable)

    def _apply(self) -> int:
        """The controlled set into the shim's filter; 0 or a negative KVM code."""
        with self._apply_lock:
            want = self.controlled()
            if want == self._installed:
                return 0
            if len(want) > layout.KVMI_MAX_MSRS:
                return -ids.KVM_ENOMEM
            c = self.ctl
            for i, m in enumerate(sorted(want)):
                c.msrs[i] = m
            c.nmsrs = len(want)
            seq = (c.seq + 1) & 0xFFFFFFFF
            c.seq = seq
            try:
                os.write(self.wrap.ctl_w, b"K")
            except OSError:
                return -ids.KVM_EFAULT
            with self._filter_cv:
                if not self._filter_cv.wait_for(lambda: seq in self._filter_replies,
                                                FILTER_TIMEOUT):
                    return -ids.KVM_EBUSY
                err = self._filter_replies.pop(seq)
            if err:
                return -ids.KVM_ENOMEM if err == errno.ENOSPC else -ids.KVM_EINVAL
            self._installed = want
            return 0

    def pause_vcpu(self, vcpu: int, wait: bool) -> int | None:
        s = self._slots[vcpu]
        s.pause_req = 1
        try:
            os.write(self.wrap.ctl_w, b"P")
        except OSError:
            return -ids.KVM_EFAULT
        if wait:
            deadline = time.monotonic() + PAUSE_WAIT
            while s.pause_req and not self._parked(vcpu):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                futex_wait(self._state_addr(vcpu), s.state, min(left, 0.01))
        return 0

    def close(self) -> None:
        self._closing = True
        for vid in list(self._workers):
            futex_wake(self._state_addr(vid))
