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
import ctypes as C
import errno
import logging
import threading
import time
from collections import deque
from typing import Sequence

from .. import uapi as u
from ..errors import FilterError, KvmError
from ..exits import GuestError
from ..msr.model import WRITE
from . import ids
from .backend import Backend
from .controlled import ControlledMsrs
from .ids import CONTINUE, CRASH, RETRY
from .owner import Introspection
from .protocol import PAGE_SIZE, pack_state
from .vcpu_state import STATE_MSR_INDICES, SYNC_MASK, EventState, vcpu_mode

__all__ = ["MachineBackend", "IntrospectionCrash", "attach", "vcpu_mode", "STATE_MSR_INDICES"]

log = logging.getLogger("kvmgate.introspection")

KICK_INTERVAL = 0.002     # re-kick a vCPU this often while a command waits for its mutex
PAUSE_WAIT = 1.0          # VM_PAUSE_VCPU with wait: at most this long for the vCPU to stop
APPLY_LOCK_TIMEOUT = 2.0  # a command waiting for another filter swap / PAUSE: -KVM_EBUSY after
QUIESCE_TIMEOUT = 5.0
INJECT_POLL = 0.05         # a pending INJECT_EXCEPTION: kick again / look for a run this often
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1
PF_VECTOR = 14
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})   # x86 SDM vol. 3 6.13


class IntrospectionCrash(GuestError):
    """The introspection tool answered an event with CRASH: the VM was stopped."""

    def __init__(self, vcpu: int, event: int, msr: int | None = None, rip: int | None = None):
        what = ids.event_name(event) + (f" (MSR {msr:#x})" if msr is not None else "")
        super().__init__(f"vCPU {vcpu}: the introspection tool answered {what} with CRASH",
                         vcpu, rip)
        self.event = event
        self.msr = msr


# --- the backend -----------------------------------------------------------------------------

class MachineBackend(Backend):
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
        self._worker: threading.Thread | None = None
        sync = bool(machine.kvm.check_extension(u.KVM_CAP_SYNC_REGS) & SYNC_MASK == SYNC_MASK)
        self._states = [EventState(v, sync) for v in self._vcpus]   # vcpu_state.py
        # Counters (for tests and the bench).
        self.msr_writes = 0          # intercepted guest writes seen
        self.msr_events = 0          # of which sent to the tool
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

    # --- Backend: CPUID, exceptions ---------------------------------------------------------

    def get_cpuid(self, vcpu: int, function: int, index: int):
        """From KVM_GET_SUPPORTED_CPUID, which Machine gives every vCPU (KVM_SET_CPUID2)."""
        if self._cpuid is None:
            blob = self.machine.kvm.supported_cpuid()
            n = u.kvm_cpuid2.from_buffer_copy(blob).nent
            size, head = C.sizeof(u.kvm_cpuid_entry2), C.sizeof(u.kvm_cpuid2)
            self._cpuid = [u.kvm_cpuid_entry2.from_buffer_copy(blob, head + i * size)
                           for i in range(n)]
        for e in self._cpuid:
            if e.function == function and (e.index == index
                                           or not e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX):
                return e.eax, e.ebx, e.ecx, e.edx
        return None

    def inject_exception(self, vcpu: int, vector: int, error_code: int, address: int) -> int:
        """KVM_SET_VCPU_EVENTS with the exception injected (CR2 = `address` for #PF, through
        KVM_SET_SREGS); delivered at the vCPU's next entry.  -KVM_EBUSY if one is pending.

        A vCPU whose thread does not run yet keeps it pending here: run() resets every vCPU
        (KVM_SET_REGS drops an injected exception), so it is set by the vCPU's own thread once
        it runs (a kick, then its kick hook)."""
        with self._lock:
            if vcpu in self._injections:
                return -ids.KVM_EBUSY
            if self.machine.vcpu_thread(vcpu) is None:
                self._injections[vcpu] = (vector, error_code, address)
                threading.Thread(target=self._inject_when_running, args=(vcpu,),
                                 name=f"kvmi-inject{vcpu}", daemon=True).start()
                return 0
        return self._vcpu_call(vcpu, self._inject_now, vcpu, vector, error_code, address)

    def _inject_now(self, vcpu: int, vector: int, error_code: int, address: int) -> int:
        v = self._vcpus[vcpu]
        ev = v.get_vcpu_events()
        if ev.exception_injected or ev.exception_pending:
            return -ids.KVM_EBUSY
        if vector == PF_VECTOR:
            sregs = v.get_sregs()
            sregs.cr2 = address
            v.set_sregs(sregs)
        ev.exception_injected, ev.exception_nr = 1, vector
        ev.exception_has_error_code = int(vector in ERROR_CODE_VECTORS)
        ev.exception_error_code = error_code & 0xFFFFFFFF
        ev.flags = 0
        v.set_vcpu_events(ev)
        return 0

    def _take_injection(self, vid: int) -> None:
        """On vCPU `vid`'s thread while it runs: set the exception kept pending, if any."""
        with self._lock:
            args = self._injections.pop(vid, None)
        if args is not None:
            if self._inject_now(vid, *args):
                log.warning("vCPU %d: an exception is already pending; INJECT_EXCEPTION of "
                            "vector %d dropped", vid, args[0])
            self._injected[vid].set()

    def _inject_when_running(self, vid: int) -> None:
        """Until the pending exception of `vid` is set: wait for a run (wait_running), then kick
        the vCPU so that its kick hook sets it; between runs, look again every INJECT_POLL."""
        done = self._injected[vid]
        while vid in self._injections:
            intro = self.intro
            if intro is None or not intro.connected:     # the session ended: dropped
                with self._lock:
                    self._injections.pop(vid, None)
                return
            done.clear()
            if self.machine.wait_running(INJECT_POLL) and self.machine.kick(vid):
                done.wait(INJECT_POLL)        # set by the hook; else kick again
            elif not self.machine.wait_running(0):
                done.wait(INJECT_POLL)        # between runs: look for the next one

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
            m.intercept_msr_writes(want, self._on_write if want else None)
        except FilterError as exc:
            log.warning("cannot intercept MSR writes %s: %s", sorted(map(hex, want)), exc)
            return -ids.KVM_ENOMEM
        except TimeoutError:
            return -ids.KVM_EBUSY
        self._installed = want
        return 0

    def _on_write(self, ex):
        """Machine interception callback (vCPU thread): the value to store, or None."""
        self.msr_writes += 1
        intro = self.intro
        vid, msr, new = ex.vcpu, ex.index, ex.data
        if intro is None or not intro.msr_wanted(vid, msr):
            return None
        # One KVM_GET_MSRS (prebuilt) for the old value and the event's state MSRs; the
        # registers from kvm_run.s (vcpu_state.py).
        st = self._states[vid]
        values = None
        old = st.read_msrs(msr)
        if old is None:                 # KVM cannot read one of them: ask one by one
            wanted = STATE_MSR_INDICES if msr in STATE_MSR_INDICES \
                else STATE_MSR_INDICES + (msr,)
            values = self._vcpus[vid].get_msrs(wanted)
            old = values.get(msr)
        if old is None or old == new:
            return None
        self.msr_events += 1
        state = st.fill(values)
        self._waiting[vid] = True           # _blocked(), inline: this is the hot path
        parked = self.machine.blocked(vid)
        parked.__enter__()
        try:
            action, value = intro.msr_event(vid, msr, old, new, state)
        finally:
            parked.__exit__(None, None, None)
            self._waiting[vid] = False
        if action == CRASH:
            exc = IntrospectionCrash(vid, ids.VCPU_EVENT_MSR, msr)
            self.crashes.append(exc)
            raise exc
        if action == RETRY:
            return old
        return value

    # --- Backend: pause -------------------------------------------------------------------

    def pause_vcpu(self, vcpu: int, wait: bool) -> int | None:
        ev = self._kicked[vcpu]
        ev.clear()
        if self.machine.kick(vcpu):
            if wait and not self._waiting[vcpu]:
                ev.wait(PAUSE_WAIT)
            self._submit(("watch", vcpu, None))   # in case the vCPU stops before its hook
            return 0
        ready = threading.Event()
        self._submit(("pause", vcpu, ready))
        if wait:
            ready.wait(PAUSE_WAIT)
        return 0

    def _on_kick(self, vid: int) -> None:
        """A Machine kick hook: on vCPU `vid`'s thread after each kick (KVM_RUN returned EINTR)."""
        self._kicked[vid].set()
        if self._injections:
            self._take_injection(vid)
        intro = self.intro
        if intro is None or not intro.pending_pauses(vid):
            return
        self._pause_here(vid)

    def _pause_here(self, vid: int) -> None:
        with self._blocked(vid):
            action = self.intro.handle_pauses(vid, lambda: self._pause_state(vid))
        if action == CRASH:
            exc = IntrospectionCrash(vid, ids.VCPU_EVENT_PAUSE)
            self.crashes.append(exc)
            raise exc

    # --- worker thread (pauses of stopped vCPUs, deferred syncs) -------------------------

    def _submit(self, job: tuple) -> None:
        with self._lock:
            self._jobs.append(job)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="kvmi-worker",
                                                daemon=True)
                self._worker.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._worker = None
                    return
                job = self._jobs.popleft()
            try:
                if job[0] == "sync":
                    with self._apply_lock:
                        self._apply()
                elif job[0] == "watch":
                    self._watch_pause(job[1])
                else:
                    self._pause_parked(job[1], job[2])
            except Exception:
                log.exception("introspection worker job %r failed", job)

    def _watch_pause(self, vid: int) -> None:
        """Hook mode: re-kick until the vCPU's hook took its pauses; if its thread ends first
        (halted, run over), send them from here."""
        intro = self.intro
        last = time.monotonic()
        while intro is not None and intro.pending_pauses(vid):
            if self.machine.vcpu_thread(vid) is None:
                self._pause_parked(vid, None)
                return
            if time.monotonic() - last > 0.1 and not self._waiting[vid]:
                self.machine.kick(vid)
                last = time.monotonic()
            time.sleep(0.002)

    def _pause_parked(self, vid: int, ready: threading.Event | None) -> None:
        """Send vCPU `vid`'s PAUSE events from this thread while every vCPU is held outside
        KVM_RUN (a vCPU blocked on the tool counts as held)."""
        intro = self.intro
        action = CONTINUE
        try:
            if intro is None or not intro.pending_pauses(vid):
                return
            if all(self.machine.vcpu_thread(i) is None for i in range(self._n)):
                # Nothing runs: nothing to hold (and VCPU_CONTROL_MSR need not wait for us).
                if ready is not None:
                    ready.set()
                action = intro.handle_pauses(vid, lambda: self._pause_state(vid))
            else:
                # While we hold every vCPU, a filter swap (VCPU_CONTROL_MSR) waits for the
                # lock: -KVM_EBUSY after APPLY_LOCK_TIMEOUT if the tool sends one first.
                with self._apply_lock:
                    with self.machine.quiesced(QUIESCE_TIMEOUT):
                        if ready is not None:
                            ready.set()
                        # If the vCPU waits for another event's reply, this waits for that
                        # event to end first (one event at a time per vCPU, as in the kernel).
                        action = intro.handle_pauses(vid, lambda: self._pause_state(vid))
        finally:
            if ready is not None:
                ready.set()
        if action == CRASH:           # recorded; stops the run if the vCPU runs
            exc = IntrospectionCrash(vid, ids.VCPU_EVENT_PAUSE)
            self.crashes.append(exc)
            self.machine.fail_run(vid, exc)


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
