"""`MachineBackend`: the introspection `Backend` on a live `Machine`, and `attach()`.

    intro = attach(m)                  # or m.introspection once Machine has the property
    intro.hook(sock, uuid)             # the owner's API (owner.py), docs/introspection.md
    intro.allow_command(ids.VCPU_CONTROL_MSR, 1); intro.allow_event(ids.VCPU_EVENT_MSR, 1)

How each part maps onto the Machine:

* VCPU_CONTROL_MSR adds the MSR to the machine's write interception (`intercept_msr_writes`),
  which is layered over the owner's filter: writes the owner's filter denies still go to the
  owner's handler, and an MSR whose guest writes the owner's filter (or policy) denies gets
  -KVM_EPERM.  The interception set is the union over vCPUs of the MSRs the tool controls;
  nothing is intercepted (no user-space exit at all) for MSRs nobody controls.
* A guest write to an intercepted MSR calls `_on_write` on the vCPU's thread: when the tool
  wants that write (MSR controlled on that vCPU, MSR event enabled and allowed) and the value
  changes (old value from KVM_GET_MSRS), the MSR event is sent and the vCPU waits (reading
  the socket itself until its reply, inbox.py); CONTINUE
  stores the tool's `new_val` (host-initiated KVM_SET_MSRS, by the machine), RETRY keeps the
  old value, CRASH raises `IntrospectionCrash` out of `m.run()`.
  With the C engine built, the C handler loop does all of that for the common case without
  Python (the session's EventPort, registered with the interception: fast_events.py,
  csrc/kvmi_event.h); what it sends but cannot finish (a command before the reply, a kick,
  CRASH, EOF, a timeout) `_on_write` adopts and finishes as above (backend_msr_events.py).
* While a vCPU waits for the tool it counts as parked for `Machine.quiesced()`, so the tool may
  send VCPU_CONTROL_MSR (a filter swap) from its event handler without a deadlock.
* Commands run on the thread holding the session's reader token (inbox.py): the reader thread,
  or a vCPU thread waiting for its event reply.  Those that need a vCPU ioctl (registers,
  MSRs, TSC) on a vCPU in KVM_RUN (which holds the vCPU's mutex) kick it (immediate_exit +
  signal) until the ioctl gets through; on the caller's own vCPU they call it directly.
* The MSR event's state: registers from kvm_run.s (KVM_CAP_SYNC_REGS), MSRs with one prebuilt
  KVM_GET_MSRS, the tool's register writes through kvm_dirty_regs (vcpu_state.py,
  docs/introspection.md §5).
* VM_PAUSE_VCPU: the vCPU is kicked and sends its PAUSE event from its own thread (through
  `Machine.add_kick_hook`); if its thread is not running, a worker thread sends the event while
  every vCPU is held outside KVM_RUN (`quiesced()`).

* GET_CPUID answers from KVM_GET_SUPPORTED_CPUID, which Machine installs on every vCPU;
  INJECT_EXCEPTION sets the exception injected with KVM_SET_VCPU_EVENTS (CR2 with
  KVM_SET_SREGS for #PF), kicking the vCPU out of KVM_RUN as above; for a vCPU whose thread
  does not run yet it stays pending until the vCPU runs (run() resets the vCPUs, which would
  drop it), then the vCPU's own thread sets it; GET_MAX_GFN is the last page of guest RAM.

Only Machine's public API is used: kick(), blocked(), quiesced(), vcpu_thread(), fail_run(),
add_kick_hook(), intercept_msr_writes(), vcpus, memory, mem_size and kvm.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import threading
from collections import deque
from typing import Sequence

from .. import uapi as u
from ..errors import FilterError, KvmError
from ..msr.model import WRITE
from . import ids
from .backend import Backend
from .backend_cpu import CpuidAndExceptions
from .backend_msr_events import MsrEvents
from .backend_pauses import Pauses
from .controlled import ControlledMsrs
from .errors_crash import IntrospectionCrash
from .owner import Introspection
from .protocol import PAGE_SIZE, pack_state
from .vcpu_state import STATE_MSR_INDICES, SYNC_MASK, EventState, vcpu_mode

__all__ = ["MachineBackend", "IntrospectionCrash", "attach", "vcpu_mode", "STATE_MSR_INDICES"]

log = logging.getLogger("kvmgate.introspection")

KICK_INTERVAL = 0.002     # re-kick a vCPU this often while a command waits for its mutex
APPLY_LOCK_TIMEOUT = 2.0  # a command waiting for another filter swap / PAUSE: -KVM_EBUSY after


# --- the backend -----------------------------------------------------------------------------

class MachineBackend(CpuidAndExceptions, Pauses, MsrEvents, Backend):
    """The live-VM side of KVMI for one Machine (see the module docstring)."""

    def __init__(self, machine):
        self.machine = machine
        self.intro: Introspection | None = None
        self._vcpus = list(machine.vcpus)
        self._n = len(self._vcpus)
        self._lock = threading.Lock()
        self._apply_lock = threading.RLock()    # one filter swap / quiesce of ours at a time
        self._controlled = ControlledMsrs(self.owner_denies, self._sync)
        self._installed: frozenset = frozenset()
        self._tsc_khz: int | None = None
        self._cpuid: list | None = None
        self._waiting = [False] * self._n       # vCPU blocked on the tool
        self._kicked = [threading.Event() for _ in range(self._n)]
        self._injections: dict[int, tuple[int, int, int]] = {}   # INJECT_EXCEPTION before run()
        self._injected = [threading.Event() for _ in range(self._n)]
        self._jobs: deque = deque()
        self._pause_done = threading.Condition(self._lock)   # a PAUSE sender ended / job queued
        self._holder: threading.Thread | None = None  # the worker while it holds every vCPU
        self._held_applies: list = []           # [(done Event, result box)] for the holder
        self._worker: threading.Thread | None = None
        sync = bool(machine.kvm.check_extension(u.KVM_CAP_SYNC_REGS) & SYNC_MASK == SYNC_MASK)
        self._sync_regs = sync
        self._states = [EventState(v, sync) for v in self._vcpus]   # vcpu_state.py
        self._init_msr_events()                 # backend_msr_events.py: msr_writes, msr_events
        self.pause_events = 0
        self.crashes: list[IntrospectionCrash] = []
        machine.add_kick_hook(self._on_kick)

    # --- helpers --------------------------------------------------------------------------

    def _current_vcpu(self) -> int | None:
        me = threading.get_ident()
        for i in range(self._n):
            if self.machine.vcpu_thread(i) == me:
                return i
        return None

    def _vcpu_call(self, index: int, fn, *args):
        """fn(*args) doing ioctls on vCPU `index`, from any thread: while the vCPU may sit in
        KVM_RUN (holding its mutex), kick it every few ms until fn returns."""
        ident = self.machine.vcpu_thread(index)
        if ident is None or ident == threading.get_ident():
            return fn(*args)
        done = threading.Event()

        def kicker():
            while not done.is_set():
                if not self.machine.kick(index):
                    return
                done.wait(KICK_INTERVAL)

        t = threading.Thread(target=kicker, name=f"kvmi-kick{index}", daemon=True)
        t.start()
        try:
            return fn(*args)
        finally:
            done.set()

    @contextlib.contextmanager
    def _blocked(self, vid: int):
        self._waiting[vid] = True
        try:
            with self.machine.blocked(vid):
                yield
        finally:
            self._waiting[vid] = False

    def state(self, vid: int, msrs: dict[int, int] | None = None) -> bytes:
        """The 536-byte state block of vCPU `vid` (on its thread, or while it is parked);
        `msrs`: the state MSRs if already read."""
        v = self._vcpus[vid]
        regs, sregs = v.get_regs(), v.get_sregs()
        if msrs is None:
            msrs = v.get_msrs(STATE_MSR_INDICES)
        return pack_state(vcpu_mode(sregs), bytes(regs), bytes(sregs),
                          [msrs.get(i, 0) for i in STATE_MSR_INDICES])

    def event_state(self, vid: int) -> EventState:
        """vCPU `vid`'s prebuilt event buffers and sync-regs state (vcpu_state.py)."""
        return self._states[vid]

    def _pause_state(self, vid: int) -> bytes:
        self.pause_events += 1          # called once per PAUSE event actually sent
        return self.state(vid)

    # --- Backend: VM ----------------------------------------------------------------------

    def vcpu_count(self) -> int:
        return self._n

    def _range(self, gpa: int, size: int) -> bool:
        if size <= 0 or (gpa & (PAGE_SIZE - 1)) + size > PAGE_SIZE:
            raise KvmError(errno.EINVAL, "VM_READ/WRITE_PHYSICAL", None,
                           f"{size} bytes at {gpa:#x} cross a page")
        return 0 <= gpa and gpa + size <= self.machine.mem_size

    def read_physical(self, gpa: int, size: int) -> bytes | None:
        if not self._range(gpa, size):
            return None
        return bytes(self.machine.memory[gpa:gpa + size])

    def write_physical(self, gpa: int, data: bytes) -> bool:
        if not self._range(gpa, len(data)):
            return False
        self.machine.memory[gpa:gpa + len(data)] = data
        return True

    def tsc_khz(self) -> int | None:
        if self._tsc_khz is None:
            try:
                self._tsc_khz = self._vcpu_call(0, self._vcpus[0].tsc_khz)
            except KvmError:
                return 0
        return self._tsc_khz

    def max_gfn(self) -> int:
        return (self.machine.mem_size - 1) >> 12

    # --- Backend: registers ---------------------------------------------------------------

    def get_registers(self, vcpu: int, msrs: Sequence[int]):
        v = self._vcpus[vcpu]

        def grab():
            return v.get_regs(), v.get_sregs(), (v.get_msrs(msrs) if msrs else {})

        regs, sregs, values = self._vcpu_call(vcpu, grab)
        missing = [i for i in msrs if i not in values]
        if missing:
            raise KvmError(errno.EINVAL, "KVM_GET_MSRS", v, f"MSR {missing[0]:#x} cannot be read")
        return vcpu_mode(sregs), bytes(regs), bytes(sregs), [(i, values[i]) for i in msrs]

    def set_registers(self, vcpu: int, regs: bytes) -> None:
        # On the vCPU's thread inside an event (through kvm_run.s.regs and kvm_dirty_regs when
        # synced, vcpu_state.py), or while it is parked (PAUSE without the hook): KVM_SET_REGS.
        st = self._states[vcpu]
        if self.machine.vcpu_thread(vcpu) != threading.get_ident():
            st = EventState(self._vcpus[vcpu], False)
        st.set_regs(regs)

    # --- Backend: MSR interception --------------------------------------------------------

    def owner_denies(self, msr: int) -> bool:
        """The owner's filter or policy denies guest writes to `msr`."""
        m = self.machine
        for flt in (m.msr_filter, getattr(m.policy, "filter", None)):
            if flt is not None and not flt.allows(msr, WRITE):
                return True
        return False

    def controlled(self) -> frozenset:
        """MSRs the tool controls on some vCPU (what should be intercepted)."""
        return self._controlled.union()

    @property
    def intercepted(self) -> frozenset:
        """MSRs whose guest writes currently exit to us."""
        return self._installed

    def control_msr(self, vcpu: int, msr: int, enable: bool) -> int:
        return self._controlled.control(vcpu, msr, enable)

    def _sync(self, adding: bool) -> int:
        """Make the machine's interception set the controlled set; 0 or a negative KVM code."""
        vid = self._current_vcpu() if not adding else None
        if vid is not None and not self._waiting[vid]:
            # Undoing from a vCPU thread that is not counted as parked: do it on another
            # thread, because a quiesce must not wait for its own caller's siblings blocked
            # behind it.  Until then the extra exits are answered with the guest's value.
            self._submit(("sync",))
            return 0
        # While the worker holds every vCPU for PAUSE events (the tool pauses, then controls
        # MSRs, then replies: libkvmi's order), the holder applies the change under its hold.
        with self._lock:
            if self._holder is not None and self._holder is not threading.current_thread():
                done, box = threading.Event(), [-ids.KVM_EBUSY]
                self._held_applies.append((done, box))
                self._pause_done.notify_all()
            else:
                done = None
        if done is not None:
            done.wait(APPLY_LOCK_TIMEOUT)
            return box[0]
        # A vCPU thread that closes while it waits for the tool (it read EOF or a bad reply
        # itself, inbox.py) counts as parked: it undoes the interception at once, or defers.
        if not self._apply_lock.acquire(timeout=APPLY_LOCK_TIMEOUT):
            if vid is not None:
                self._submit(("sync",))
                return 0
            return -ids.KVM_EBUSY
        try:
            return self._apply()
        finally:
            self._apply_lock.release()

    def _apply(self) -> int:
        want = self.controlled()
        if want == self._installed:
            return 0
        m = self.machine
        try:
            m.intercept_msr_writes(want, self._on_write if want else None, native=self._port)
        except FilterError as exc:
            log.warning("cannot intercept MSR writes %s: %s", sorted(map(hex, want)), exc)
            return -ids.KVM_ENOMEM
        except TimeoutError:
            return -ids.KVM_EBUSY
        self._installed = want
        return 0

def new_introspection(machine) -> Introspection:
    """The factory registered as Machine extension "introspection"."""
    backend = MachineBackend(machine)
    intro = Introspection(backend, obj=machine.vm)
    backend.intro = intro
    return intro


def attach(machine, **opts) -> Introspection:
    """The machine's `Introspection` (created once, then returned again): sets
    `machine.introspection`.  `opts`: Introspection's keywords (enabled, on_close,
    event_timeout); given again later, they update the existing object."""
    intro = machine.extension("introspection")      # new_introspection() on first use
    for key, value in opts.items():
        if key not in ("enabled", "on_close", "event_timeout"):
            raise TypeError(f"attach() got an unexpected keyword argument {key!r}")
        setattr(intro, key, value)
    return intro
