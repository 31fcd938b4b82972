"""VM_PAUSE_VCPU for MachineBackend (docs/introspection.md §2-§3): a running vCPU is kicked
and sends its PAUSE events from its own kick hook; for a vCPU that does not run, the worker
thread holds every vCPU outside KVM_RUN and sends them from a thread per vCPU (a tool may wait
for every PAUSE event before it replies to any: libkvmi's pause-all does).

A part of MachineBackend (kvmgate.introspection.machine_backend), split out by concern: it uses
the backend's machine, intro, _n, _lock, _apply_lock, _jobs, _worker, _kicked, _waiting,
_pause_done, _holder, _held_applies, _injections, crashes, _apply, _blocked, _pause_state and
_take_injection."""
from __future__ import annotations

import logging
import threading
import time

from . import ids
from .errors_crash import IntrospectionCrash
from .ids import CRASH

log = logging.getLogger("kvmgate.introspection")

PAUSE_WAIT = 1.0          # VM_PAUSE_VCPU with wait: at most this long for the vCPU to stop
QUIESCE_TIMEOUT = 5.0


class Pauses:
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
        """A Machine kick hook: on vCPU `vid`'s thread after each kick (KVM_RUN returned EINTR)
        and before its first KVM_RUN of a run.  The latter sends the PAUSE events of a vCPU
        paused while its thread did not run before it executes any guest instruction, as
        KVMI does, even when the worker's hold (_pause_parked) has not begun yet: the tool's
        pause-all of a VM about to start must not let its vCPUs run first."""
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
            self._pause_done.notify_all()
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
        """Send vCPU `vid`'s PAUSE events for a vCPU that is not running, while every vCPU is
        held outside KVM_RUN (a vCPU blocked on the tool counts as held).

        Each stopped vCPU's events go from a thread of their own, as each vCPU's would in the
        kernel: a tool may wait for the PAUSE events of every vCPU it paused (libkvmi's
        pause-all does) before it replies to any, so sending them one after the other from
        one thread would wait forever.  The hold lasts until every sender is answered; pause
        jobs queued meanwhile are sent under the same hold."""
        intro = self.intro
        if intro is None or not intro.pending_pauses(vid):
            if ready is not None:
                ready.set()
            return
        # Held even when no vCPU thread runs: a run() that starts meanwhile waits for the hold
        # to end, so no vCPU enters KVM_RUN while its PAUSE event is out (and the events'
        # register reads cannot block on a running vCPU).
        try:
            # While we hold every vCPU, a filter swap (VCPU_CONTROL_MSR) is applied by this
            # thread, under the hold (_sync hands it over).
            with self._apply_lock, self.machine.quiesced(QUIESCE_TIMEOUT):
                if ready is not None:
                    ready.set()
                    ready = None
                done: list[int] = []            # vCPUs whose senders ended (under _lock)
                sending = {vid}
                with self._lock:
                    self._holder = threading.current_thread()
                try:
                    self._pause_sender(vid, done).start()
                    self._hold_until_answered(intro, sending, done)
                finally:
                    with self._lock:
                        self._holder = None
        finally:
            if ready is not None:
                ready.set()

    def _hold_until_answered(self, intro, sending: set, done: list) -> None:
        """The holder's loop: start senders for queued pause jobs and for every held vCPU with
        pending pauses (a kicked vCPU cannot send its own from its kick hook while held), apply
        interception changes the tool asks for meanwhile, and return once every sender is
        answered and nothing is left to send or apply."""
        while True:
            with self._lock:
                jobs = [j for j in self._jobs if j[0] == "pause"]
                for j in jobs:
                    self._jobs.remove(j)
                applies, self._held_applies = self._held_applies, []
            for _, _v, r in jobs:
                if r is not None:
                    r.set()
            for ev, box in applies:
                try:
                    box[0] = self._apply()
                finally:
                    ev.set()
            for v in range(self._n):
                if v not in sending and intro.pending_pauses(v):
                    sending.add(v)
                    self._pause_sender(v, done).start()
            with self._lock:
                if len(done) == len(sending) and not self._held_applies and \
                        not any(j[0] == "pause" for j in self._jobs) and \
                        not any(v not in sending and intro.pending_pauses(v) for v in range(self._n)):
                    self._holder = None          # a later apply takes the lock itself
                    return
                self._pause_done.wait(0.05)

    def _pause_sender(self, vid: int, done: list) -> threading.Thread:
        """A thread that sends vCPU `vid`'s pending PAUSE events and waits for the replies
        (docs/introspection.md §3); a CRASH reply fails the run."""
        def send() -> None:
            try:
                intro = self.intro
                if intro is not None and intro.pending_pauses(vid):
                    if intro.handle_pauses(vid, lambda: self._pause_state(vid)) == CRASH:
                        exc = IntrospectionCrash(vid, ids.VCPU_EVENT_PAUSE)
                        self.crashes.append(exc)     # recorded; stops the run if the vCPU runs
                        self.machine.fail_run(vid, exc)
            except Exception:
                log.exception("introspection: PAUSE events of vCPU %d failed", vid)
            finally:
                with self._lock:
                    done.append(vid)
                    self._pause_done.notify_all()
        return threading.Thread(target=send, name=f"kvmi-pause-{vid}", daemon=True)
