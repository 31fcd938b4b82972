"""vCPU thread coordination: one thread per vCPU in KVM_RUN, and the protocol that gets them
out of it: kick (immediate_exit, then a signal to the thread), park (hold a vCPU outside
KVM_RUN while another thread swaps what it depends on), quiesce (park every other vCPU),
stop.  Kernel rules: Documentation/virt/kvm/api.rst, KVM_RUN and KVM_CAP_IMMEDIATE_EXIT
(docs/kvm-msr.md, "4. Exits to user space" and "6. Python-specific behaviour").

KICK_SIGNAL needs a Python handler (a no-op), installed from the main thread when this module
is imported: its default action would kill the process, and a signal with SIG_IGN would not
interrupt KVM_RUN.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Callable

KICK_SIGNAL = signal.SIGRTMIN + 6


def install_kick_handler() -> bool:
    """Give KICK_SIGNAL a (no-op) Python handler so it interrupts KVM_RUN (main thread only);
    True when a handler is in place."""
    if signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, signal.SIG_IGN, None):
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(KICK_SIGNAL, _kicked)
    return True


def _kicked(_sig, _frame) -> None:
    """KICK_SIGNAL's handler: nothing to do, KVM_RUN has returned -EINTR."""


install_kick_handler()


class VcpuState:
    """One vCPU, its thread's identity and what it did in the current run."""
    __slots__ = ("index", "vcpu", "msr_exits", "gp_faults", "exits", "msr_count", "gp_count",
                 "ident", "alive", "error", "parked", "live")

    def __init__(self, index: int, vcpu):
        self.index = index
        self.vcpu = vcpu
        self.ident = None
        self.alive = False
        self.parked = False
        self.reset()

    def reset(self) -> None:
        self.msr_exits = []
        self.gp_faults = []
        self.exits = 0
        self.msr_count = 0
        self.gp_count = 0
        self.error = None
        self.live = (0, 0, None)    # published by vm.loop while running: see live_exits()

    def live_exits(self) -> tuple[int, int]:
        """(exits, MSR exits) of the current run so far, from any thread: what the exit loop
        last published (every 256 exits, each interruption, the end) plus, while a run loop
        answers exits itself, its live count."""
        n, m, c = self.live
        k = c.answered if c is not None else 0
        return n + k, m + k


class VcpuThreads:
    """The threads of a run and the kick/park/quiesce/stop protocol between them.

    `kick_hooks`: fn(vcpu index) called on a vCPU's own thread after each kick, and once
    before its first KVM_RUN of a run (`started`), so work queued for a vCPU whose thread was
    not running (an introspection tool's VM_PAUSE_VCPU) is done before it runs guest code
    (add_kick_hook / remove_kick_hook; several at once)."""

    def __init__(self, states: list[VcpuState]):
        self.states = states
        self.stopping = False
        self.running = False
        self._ran = False
        self._lock = threading.Lock()
        self._park = threading.Condition(self._lock)
        self._pause_req = False
        self._pause_gen = 0
        self._quiesce_lock = threading.RLock()     # one quiescer at a time: a swap is whole
        self._kick_hooks: tuple[Callable[[int], None], ...] = ()

    # ---- registrations
    def add_kick_hook(self, fn: Callable[[int], None]) -> Callable[[int], None]:
        with self._lock:
            self._kick_hooks += (fn,)
        return fn

    def remove_kick_hook(self, fn: Callable[[int], None]) -> None:
        with self._lock:
            hooks = list(self._kick_hooks)
            if fn in hooks:
                hooks.remove(fn)
            self._kick_hooks = tuple(hooks)

    # ---- a run
    def begin(self) -> None:
        """Mark a run as started; RuntimeError if one is in progress."""
        with self._lock:
            if self.running:
                raise RuntimeError("this Machine is already running")
            self.running = self._ran = True
        self.stopping = False

    def end(self) -> None:
        with self._park:
            self.running = False
            self._park.notify_all()

    def enter(self, st: VcpuState) -> None:
        """On the vCPU's own thread, before its first KVM_RUN.  A vCPU that starts while a
        pause is on parks first: the quiescer did not count it, and it must not run half a
        swap (one policy's filter with the other's handlers)."""
        with self._park:
            st.ident = threading.get_ident()
            st.alive = True
            self._park.notify_all()
            if self._pause_req:
                st.parked = True
                self._await_pause_end()
                st.parked = False

    def started(self, st: VcpuState) -> None:
        """On the vCPU's own thread after enter(), before its first KVM_RUN: the kick hooks,
        as after a kick (a hook that finds nothing to do returns at once)."""
        self._call_kick_hooks(st)

    def leave(self, st: VcpuState) -> None:
        with self._park:
            st.alive = False
            self._park.notify_all()

    def interrupted(self, st: VcpuState) -> None:
        """On the vCPU's thread after KVM_RUN returned -EINTR (and the run goes on): park if a
        pause is requested, then call the kick hooks."""
        if self._pause_req:
            self._parked(st)
        self._call_kick_hooks(st)

    def _call_kick_hooks(self, st: VcpuState) -> None:
        for hook in self._kick_hooks:
            hook(st.index)

    def wait_running(self, timeout: float | None = None) -> bool:
        """Until every vCPU thread of the current (or next) run has started: True; False when
        that run is over or `timeout` passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._park:
            while True:
                if self.running and self.states and all(st.alive for st in self.states):
                    return True
                if not self.running and self._ran:
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._park.wait(left)

    def wait_gone(self, timeout: float = 10.0) -> None:
        """Until the run is over (when the caller is not one of its vCPU threads) and no vCPU
        thread but the caller's runs, so nothing is closed under KVM_RUN or under run()."""
        me = threading.get_ident()
        deadline = time.monotonic() + timeout
        with self._park:
            inside = any(st.alive and st.ident == me for st in self.states)
            while (self.running and not inside) or \
                    any(st.alive and st.ident != me for st in self.states):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._park.wait(left)

    def current(self) -> VcpuState | None:
        """The caller's vCPU, if the caller is a running vCPU thread."""
        me = threading.get_ident()
        with self._lock:
            for st in self.states:
                if st.alive and st.ident == me:
                    return st
        return None

    def thread_of(self, index: int) -> int | None:
        st = self.states[index]
        with self._lock:
            return st.ident if st.alive else None

    # ---- stopping and kicking
    def stop(self) -> None:
        """Ask every vCPU to stop; returns at once."""
        self.stopping = True
        for st in self.states:
            self.kick(st)

    def fail(self, index: int, exc: BaseException) -> bool:
        """Stop the run so that it raises `exc` (for vCPU `index`); False if not running."""
        st = self.states[index]
        with self._lock:
            if not st.alive:
                return False
            if st.error is None:
                st.error = exc
        self.stop()
        return True

    def kick(self, st: VcpuState) -> bool:
        """immediate_exit, then KICK_SIGNAL to the vCPU's thread (not to the caller's own, and
        only while the thread runs: a dead thread's ident may be reused).  False if it does
        not run."""
        st.vcpu.set_immediate_exit(True)
        with self._lock:
            if not st.alive or st.ident is None:
                return False
            if st.ident != threading.get_ident():
                if not install_kick_handler():
                    raise RuntimeError(f"signal {KICK_SIGNAL} has no handler: import kvmgate from "
                                       "the main thread first (its default action would kill "
                                       "the process)")
                try:
                    signal.pthread_kill(st.ident, KICK_SIGNAL)
                except (ProcessLookupError, OSError):
                    pass
            return True

    # ---- parking
    @contextlib.contextmanager
    def quiesced(self, timeout: float = 10.0):
        """Hold every vCPU except the caller's outside KVM_RUN for the duration of the block.
        One quiescer at a time; a vCPU thread waiting for its turn counts as parked."""
        mine = self.current()
        if not self._quiesce_lock.acquire(blocking=False):
            if mine is None:
                self._quiesce_lock.acquire()
            else:
                with self.blocked(mine):
                    self._quiesce_lock.acquire()
        try:
            with self._pause_others(timeout):
                yield
        finally:
            self._quiesce_lock.release()

    @contextlib.contextmanager
    def _pause_others(self, timeout: float):
        me = threading.get_ident()
        with self._lock:
            nested = self._pause_req               # the caller's own pause is on (RLock)
            if not nested:
                others = [st for st in self.states if st.alive and st.ident != me]
                self._pause_req = True             # also holds vCPUs that start meanwhile
                self._pause_gen += 1
        if nested:
            yield
            return
        try:
            for st in others:
                self.kick(st)
            deadline = time.monotonic() + timeout
            with self._park:
                while not all(st.parked or not st.alive for st in others):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("vCPUs did not pause (a handler is blocked?)")
                    self._park.wait(left)
            yield
        finally:
            with self._park:
                self._pause_req = False
                self._park.notify_all()

    def blocked(self, st: VcpuState) -> "Blocked":
        """Around a wait on another party on the vCPU's own thread: quiesced() counts it as
        parked meanwhile; leaving waits for a pause in progress to end (a context manager,
        `Blocked`; or block() / unblock())."""
        return Blocked(self, st)

    def block(self, st: VcpuState) -> None:
        """On the vCPU's own thread: count it as parked from now on.  No lock unless a pause
        is on: a quiescer sets _pause_req before it looks at `parked`, and the vCPU sets
        `parked` before it looks at _pause_req, so either the quiescer sees the vCPU parked
        or the vCPU sees the pause and wakes the quiescer."""
        st.parked = True
        if self._pause_req:
            with self._park:
                self._park.notify_all()

    def unblock(self, st: VcpuState) -> None:
        """On the vCPU's own thread, after block(): no longer parked; if a pause is on, park
        until it ends (the same ordering argument as block(), the other way round: the vCPU
        clears `parked` before it looks at _pause_req)."""
        st.parked = False
        if self._pause_req:
            self._parked(st)

    def _parked(self, st: VcpuState) -> None:
        with self._park:
            st.parked = True
            self._park.notify_all()
            self._await_pause_end()
            st.parked = False

    def _await_pause_end(self) -> None:
        """With _park held: wait until the pause in progress now ends (not a later one, so
        back-to-back swaps cannot starve a vCPU), or the run stops."""
        gen = self._pause_gen
        while self._pause_req and self._pause_gen == gen and not self.stopping:
            self._park.wait(0.5)


class Blocked:
    """VcpuThreads.blocked()'s context manager (a class, not a generator: it is on the
    introspection event path, once per event)."""
    __slots__ = ("_threads", "_st")

    def __init__(self, threads: VcpuThreads, st: VcpuState):
        self._threads = threads
        self._st = st

    def __enter__(self) -> "Blocked":
        self._threads.block(self._st)
        return self

    def __exit__(self, *exc) -> bool:
        self._threads.unblock(self._st)
        return False
