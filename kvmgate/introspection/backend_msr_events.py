"""Guest writes of controlled MSRs for MachineBackend: the MSR event (docs/introspection.md §5).

A part of MachineBackend (kvmgate.introspection.machine_backend), split out by concern: it uses
the backend's machine, intro, _n, _vcpus, _states, _sync_regs, _waiting and crashes.

The Machine calls `_on_write` (the interception callback) on the vCPU's thread for each guest
write to an intercepted MSR that Python sees; the C event path (fast_events.py,
csrc/kvmi_event.h) answers the common case before that, and what it sent but left half done
arrives here as a handoff (`_adopt`).  msr_writes / msr_events count both paths.
"""
from __future__ import annotations

from . import ids
from .errors_crash import IntrospectionCrash
from .fast_events import make_port
from .ids import CRASH, RETRY
from .vcpu_state import STATE_MSR_INDICES


class MsrEvents:
    def _init_msr_events(self) -> None:
        self._port = None                       # the current session's EventPort, if any
        self._ports: list = []                  # every session's (their counters)
        self._writes = 0             # intercepted guest writes seen in Python
        self._events = 0             # of which sent to the tool from Python

    @property
    def msr_writes(self) -> int:
        """Intercepted guest writes seen (Python and the C event path)."""
        return self._writes + sum(p.writes for p in self._ports)

    @property
    def msr_events(self) -> int:
        """MSR events sent to the tool (Python and the C event path)."""
        return self._events + sum(p.events for p in self._ports)

    def event_port(self, sock, abi, event_timeout):
        """Backend.event_port: the C MSR event path for this session (fast_events.py)."""
        port = make_port(self._n, sock, abi, event_timeout, self._sync_regs)
        if port is not None:
            self._port = port
            self._ports.append(port)
        return port

    def _on_write(self, ex):
        """Machine interception callback (vCPU thread): the value to store, or None."""
        self._writes += 1
        intro = self.intro
        vid, msr, new = ex.vcpu, ex.index, ex.data
        for port in self._ports:            # C sent this write's event: wait for its reply
            handoff = port.take_handoff(vid)
            if handoff is not None:
                return self._adopt(vid, port, handoff)
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
        if old is None or not ids.msr_write_is_event(old, new):
            return None
        self._events += 1
        state = st.fill(values)
        self._waiting[vid] = True           # _blocked(), inline: this is the hot path
        parked = self.machine.blocked(vid)
        parked.__enter__()
        try:
            action, value = intro.msr_event(vid, msr, old, new, state)
        finally:
            parked.__exit__(None, None, None)
            self._waiting[vid] = False
        return self._answer(vid, msr, old, action, value)

    def _adopt(self, vid: int, port, handoff) -> int | None:
        """The rest of an MSR event the C path sent (csrc/kvmi_event.h, KG_EV_HANDOFF)."""
        seq, msr, old, new, elapsed, data = handoff
        intro = self.intro
        srv = None if intro is None else intro.server
        if srv is None or srv.port is not port:
            # its session is over: give the token back (its reader thread waits for it to
            # close the socket); the guest's value, as with no tool
            port.token_adopt()
            port.token_release(False)
            return None
        self._waiting[vid] = True
        parked = self.machine.blocked(vid)
        parked.__enter__()
        try:
            action, value = srv.adopt_msr_event(vid, seq, old, new, data, elapsed)
        finally:
            parked.__exit__(None, None, None)
            self._waiting[vid] = False
        return self._answer(vid, msr, old, action, value)

    def _answer(self, vid: int, msr: int, old: int, action, value) -> int | None:
        if action == CRASH:
            exc = IntrospectionCrash(vid, ids.VCPU_EVENT_MSR, msr)
            self.crashes.append(exc)
            raise exc
        if action == RETRY:
            return old
        return value
