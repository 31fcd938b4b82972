"""Supervisor: a running Machine driven by process signals, with no work in a signal handler.

SIGHUP, SIGINT, SIGTERM and SIGUSR1 arrive as numbers in a pipe, whichever thread the kernel
delivered them to (kvmgate.signal_pipe).  One ordinary thread reads that pipe and acts:

* SIGHUP: load, compile and swap the policy file (`Machine.set_policy`; the audit log takes
  its audit_rate, audit_burst and audit_failure).  Any failure is
  reported as ``reload refused: <why>`` and the old policy stays; the guest keeps running.
  Signals that arrive during a reload coalesce into one more reload.
* SIGINT / SIGTERM: `Machine.stop()`; the caller then ends the run the same clean way for
  both (`stop_signal` says which came first).
* SIGUSR1: `AuditLog.reopen()` (logrotate's postrotate).

Nothing runs in a signal handler, so a reload never nests in another and never interrupts a
thread that holds a lock.  Signals that arrive before the guest runs wait in the pipe.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable

from .signal_pipe import QUIT, SignalPipe

HANDLED = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class Supervisor:
    """Context manager around `machine.run()` in the main thread.

    `load(path)` returns something `Machine.set_policy` takes (e.g. kvmgate.policy.load_policy);
    `say(line)` prints one status line (stderr by default)."""

    def __init__(self, machine, *, policy_path: str | None = None, load: Callable | None = None,
                 audit=None, say: Callable[[str], None] | None = None, reload_counter=None):
        self.machine = machine
        self.reload_counter = reload_counter        # e.g. kvmgate.metrics.Reloads: count(applied)
        self.policy_path = policy_path
        self.load = load
        self.audit = audit
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.stop_signal: int | None = None
        self.reloads = 0
        self.refused = 0
        self._thread: threading.Thread | None = None
        self._pipe = SignalPipe(HANDLED)

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("Supervisor must be entered from the main thread (signals)")
        self._pipe.open()
        self._thread = threading.Thread(target=self._main, name="kvmgate-supervisor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._pipe.quit()
            self._thread.join()
            self._thread = None
        self._pipe.close()

    # ---- the supervisor thread
    def _main(self) -> None:
        pending: list[int] = []
        if not self._wait_running(pending):
            return
        self.say(f"kvmgate: running pid {os.getpid()}")
        while True:
            sigs = set(pending)
            pending = []
            if QUIT in sigs:
                return
            if sigs & {signal.SIGINT, signal.SIGTERM}:
                if self.stop_signal is None:
                    self.stop_signal = signal.SIGINT if signal.SIGINT in sigs else signal.SIGTERM
                self.machine.stop()
            if signal.SIGUSR1 in sigs and self.audit is not None:
                self._reopen()
            if signal.SIGHUP in sigs and self.stop_signal is None:
                self.reload()
            pending = self._pipe.read(block=True)

    def _wait_running(self, pending: list[int]) -> bool:
        """Until the guest runs, keep what arrives in `pending`; False if asked to quit."""
        while not self.machine.wait_running(0.1):
            if self._pipe.readable(0.1):
                pending.extend(self._pipe.read(block=False))
                if QUIT in pending:
                    return False
        return True

    def reload(self) -> bool:
        """Load, compile and swap the policy file; on any failure say why and keep the old one."""
        if self.policy_path is None or self.load is None:
            return False
        try:
            policy = self.load(self.policy_path)
            self.machine.set_policy(policy, self.audit)
            if self.audit is not None and hasattr(policy, "audit_failure"):
                self.audit.configure(policy.audit_rate, policy.audit_burst, policy.audit_failure)
        except Exception as e:   # noqa: BLE001 - whatever a bad file causes, the guest goes on
            self.refused += 1
            if self.reload_counter is not None:
                self.reload_counter.count(False)
            why = str(e) or type(e).__name__
            if not isinstance(e, (OSError, ValueError)) and type(e).__module__.split(".")[0] != "kvmgate":
                why = f"{type(e).__name__}: {why}"
            self.say(f"kvmgate: reload refused: {why}")
            return False
        self.reloads += 1
        if self.reload_counter is not None:
            self.reload_counter.count(True)
        self.say(f"kvmgate: reloaded {self.policy_path}")
        return True

    def _reopen(self) -> None:
        try:
            self.audit.reopen()
        except OSError as e:
            self.say(f"kvmgate: audit reopen failed, still writing the old file: {e}")
            return
        self.say(f"kvmgate: audit log reopened {self.audit.path}")
