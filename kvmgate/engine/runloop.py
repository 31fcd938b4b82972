"""The C vCPU run loop (csrc/runloop.c) for Machine: KVM_RUN with the GIL released, and every
MSR exit a policy bound through the C engine answers (deny, ignore, constant, emulate,
forward, [unknown], [invalid], logged or not; audit mode) answered in C without entering
Python.  Only exits that need Python come back to vm.loop.run_vcpu: ports, HLT, errors,
interruptions (kicks, stop(), timeouts, Ctrl-C, policy swaps), and the writes of MSRs an
interception takes (Machine.add_interception, introspection).

Python on_msr handlers (and Python policies) run from C too, with HANDLERS_IN_C:
_engine.HandlerLoop does the exit loop's MSR branch (an MsrExit per exit, gate.handler read at
each exit, its answer applied, InjectGP and exceptions as in vm/loop.py) without Python
bytecode of the loop itself.  The handler loop also runs an interception's registered C path
(MsrGate.native_interception: an introspection EventPort) on the writes routed to it, with the
GIL released, before any handler (csrc/kvmi_event.h).

Registration: importing kvmgate.engine registers `CRunLoop.for_run` with
vm.register_run_loop when the C engine is built, so every Machine.run() uses it.  Within the
run each vCPU follows the gate (checked before each KVM_RUN): an engine policy's handler -> the
engine loop; anything else -> the handler loop.

Audit records: logged and counted decisions go into a per-vCPU ring (struct kg_ring); the
C drain (auditsink.py) writes them to the policy's AuditLog: on the vCPU's thread when the
ring is nearly full and whenever an exit comes back to Python (so records stay in order with
the ones Python makes), and from a drain thread every DRAIN_PERIOD seconds.

keep_exits (Machine(keep_exits=True), the default for short runs and tests): every exit the C
loop answers is also pushed into a second ring and listed in the vCPU's `msr_exits` as an
MsrExit (index, is_write, data, reason, vcpu, reply) before the next exit Python handles, in
order, so results look as they do with the Python loop; this costs Python per exit, so long
runs use keep_exits=False, which keeps only the counts."""
from __future__ import annotations

import errno
import threading
import weakref

from ..audit import AuditFailure
from ..errors import InjectGP, KvmError
from ..exits import MsrExit
from ..msr.model import EXIT_REASON_FILTER
from ..vcpu_exit import INTERRUPTED
from ..vm import register_run_loop
from . import binding
from .auditsink import rules_for, sink_for
from .binding import RES_GP, RES_VALUE
from .ring import RECORD, RF_WRITE, Ring
from .table import logs as table_logs

RING_CAPACITY = 8192        # audit records per vCPU (512 KiB); nearly full: the vCPU drains
KEEP_CAPACITY = 4096        # keep_exits records per vCPU
DRAIN_PERIOD = 0.05         # seconds between the drain thread's passes
# On the main thread, the C loop returns this often (KG_LOOP_TICK) while the guest keeps
# exiting, so that a signal landing between two KVM_RUNs (no -EINTR reports it) still reaches
# its Python handler: Ctrl-C and SIGTERM stop a guest that floods policy exits.
MAIN_TICK_US = 20_000
# Python on_msr handlers called from C too (_engine.HandlerLoop: the exit loop's MSR branch
# without its Python bytecode); False: Vcpu.run() and vm.loop's dispatch for them
HANDLERS_IN_C = True
KVM_CAP_SYNC_REGS, KVM_SYNC_X86_REGS = 74, 0x1    # linux/kvm.h; api.rst "KVM_CAP_SYNC_REGS"


def engine_handler(handler):
    """(engine, audit) of an engine policy's handler (make_engine_handler), else None."""
    engine = getattr(handler, "engine", None)
    return None if engine is None else (engine, getattr(handler, "audit", None))


class CRunLoop:
    """One Machine.run()'s C run loop (see the module docstring and vm.register_run_loop)."""

    def __init__(self, machine):
        self.machine = machine
        self.gate = machine.gate
        self.keep_exits = machine.keep_exits
        self.sync = bool(machine.kvm.check_extension(KVM_CAP_SYNC_REGS) & KVM_SYNC_X86_REGS)
        self.vcpus: list[VcpuLoop] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._drainer: threading.Thread | None = None
        self.error: BaseException | None = None

    @classmethod
    def for_run(cls, machine):
        """The registered factory: a CRunLoop for every run when the C engine is built (with
        HANDLERS_IN_C off: only when an engine policy is bound as the run starts), else None."""
        if not binding.available() or \
                (not HANDLERS_IN_C and engine_handler(machine.gate.owner) is None):
            return None
        return cls(machine)

    def vcpu(self, st) -> VcpuLoop:
        v = VcpuLoop(self, st)
        with self._lock:
            self.vcpus.append(v)
        return v

    def audit_started(self) -> None:
        """A vCPU has an audit ring: run the drain thread (once)."""
        with self._lock:
            if self._drainer is None and not self._done.is_set():
                self._drainer = threading.Thread(target=self._drain_loop, daemon=True,
                                                 name="kvmgate-audit-drain")
                self._drainer.start()

    def _drain_loop(self) -> None:
        while not self._done.wait(DRAIN_PERIOD):
            for v in list(self.vcpus):
                try:
                    v.drain_audit()
                except AuditFailure as e:         # audit_failure = "stop": end the run
                    if self.error is None:
                        self.error = e
                    self.machine.stop()
                    return

    def finish(self) -> BaseException | None:
        """End of the run: stop the drain thread, deliver every record left, hand owed
        suppressed counts to the logs.  The audit failure that stopped the run, if any."""
        self._done.set()
        t = self._drainer
        if t is not None and t is not threading.current_thread():
            t.join()
        sinks = set()
        for v in self.vcpus:
            try:
                v.drain_audit()
            except AuditFailure as e:
                self.error = self.error or e
            if v.audit_pair is not None:
                sinks.add(v.audit_pair[0])
        for s in sinks:
            s.settle()
        return self.error


class VcpuLoop:
    """One vCPU's side of a CRunLoop: run() for vm.loop.run_vcpu."""

    def __init__(self, owner: CRunLoop, st):
        self._owner = weakref.ref(owner)    # no cycle: the run's objects go with the run
        self.gate, self.sync, self.keep_exits = owner.gate, owner.sync, owner.keep_exits
        self.st = st
        self.vcpu = st.vcpu
        self._handler = object()        # the gate handler the loop is configured for
        self._loop = None               # _engine.Loop while the handler is an engine's
        self._c = None                  # the Loop object (kept across engine swaps)
        self._h = None                  # the HandlerLoop (Python handlers), made on first use
        self.audit_pair = None          # (AuditSink, Rules) of the records in the ring
        self.ring = None
        self.keep = Ring(KEEP_CAPACITY) if owner.keep_exits else None
        self._decode = st.vcpu.exits.decode

    @property
    def answered(self) -> int:
        """MSR exits handled in C (by the engine or through a Python handler) so far."""
        return self.engine_answered + self.handler_answered

    @property
    def engine_answered(self) -> int:
        """MSR exits the engine answered (no Python at all)."""
        c = self._c
        return c.answered if c is not None else 0

    @property
    def handler_answered(self) -> int:
        """MSR exits the handler loop gave to a Python handler."""
        h = self._h
        return h.answered if h is not None else 0

    def run(self):
        """Vcpu.run() with the C loop: the next exit Python must handle."""
        if self.gate.handler is not self._handler:
            self._configure()
        loop = self._loop
        if loop is None:
            return self.vcpu.run()
        if loop is self._h:
            rc = loop.run()
            if rc == 0:
                return self._decode()
            if rc == -errno.EINTR:
                return INTERRUPTED
            raise KvmError(-rc, "KVM_RUN", self.vcpu)
        run = loop.run
        tick = MAIN_TICK_US if threading.current_thread() is threading.main_thread() else 0
        while True:
            rc = run(tick)
            if self.keep is not None and loop.last:
                self._keep()
            ring = self.ring
            if ring is not None and ring.pending():
                self.drain_audit()
            if rc == 0:
                return self._decode()
            if rc == 1 or rc == 2:      # KG_LOOP_DRAIN: drained above; KG_LOOP_TICK
                continue
            if rc == -errno.EINTR:
                return INTERRUPTED
            raise KvmError(-rc, "KVM_RUN", self.vcpu)

    def _configure(self) -> None:
        """Follow the gate: the engine, audit log and interceptions of its current handler."""
        gate = self.gate
        handler = gate.handler
        eh = engine_handler(gate.owner)
        if eh is None:
            if HANDLERS_IN_C and self._h is None:
                st = self.st
                self._h = binding.native().HandlerLoop(
                    self.vcpu.fd, self.vcpu.run_addr, gate, MsrExit, InjectGP, st.index,
                    self.vcpu, st.msr_exits if self.keep_exits else None)
            if self._h is not None:
                # an interception's C path (introspection MSR events, csrc/kvmi_event.h)
                native, msrs = gate.native_interception()
                if native is not None and not isinstance(native, binding.native().EventPort):
                    native, msrs = None, ()
                self._h.configure_events(native, msrs)
            self._loop = self._h
            self._handler = handler
            return
        engine, audit = eh
        pair = None if audit is None else (sink_for(audit), rules_for(engine.table))
        if pair != self.audit_pair:
            self.drain_audit()              # records of the previous table go out with its rules
            if self.audit_pair is not None:
                with self.audit_pair[0].lock:
                    self.audit_pair = pair
            else:
                self.audit_pair = pair
        if pair is not None and self.ring is None:
            self.ring = Ring(RING_CAPACITY)
            owner = self._owner()
            if owner is not None:
                owner.audit_started()
        intercepted = sorted(gate.intercepted)
        # RIPs from kvm_run.s.regs only when records can need them: KVM copying the registers
        # at every exit is not free (about 5% of an exit here)
        flags = binding.native().LOOP_SYNC_REGS if self.sync and pair is not None and \
            table_logs(engine.table) else 0
        if intercepted and not gate.exit_mask & EXIT_REASON_FILTER:
            flags |= binding.native().LOOP_FILTER_RETURNS   # as the router: KVM's #GP for the owner
        ring = None if pair is None else self.ring.buffer
        if self._c is None:
            self._c = binding.native().Loop(
                engine.native, self.vcpu.fd, self.vcpu.run_addr, self.st.index,
                keep=None if self.keep is None else self.keep.buffer, owner=self.vcpu)
        self._c.configure(engine.native, flags, intercepted, ring)
        self._loop = self._c
        self._handler = handler

    def _keep(self) -> None:
        """keep_exits: the exits the C loop answered, as MsrExit records, in order."""
        st, vcpu, vid = self.st, self.vcpu, self.st.index
        append = st.msr_exits.append
        raw = self.keep.drain_raw()
        while raw:
            for _t, _rip, data, value, index, _v, _rule, reason, _a, result, flags in \
                    RECORD.iter_unpack(raw):
                w = bool(flags & RF_WRITE)
                if result == RES_GP or (not w and result != RES_VALUE):
                    reply = "gp"
                else:
                    reply = None if w else value
                append(MsrExit(index, w, data, reason, vid, reply, vcpu))
            raw = self.keep.drain_raw()

    def drain_audit(self) -> None:
        """The audit ring's pending records into the log (any thread)."""
        ring = self.ring
        while ring is not None and ring.pending():
            pair = self.audit_pair
            if pair is None:
                return
            sink, rules = pair
            with sink.lock:
                if self.audit_pair is not pair:
                    continue
                sink.drain_locked(ring, rules)
            return


if binding.available():
    register_run_loop(CRunLoop.for_run)

__all__ = ["CRunLoop", "VcpuLoop", "engine_handler"]
