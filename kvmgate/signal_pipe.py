"""Process signals as numbers in a pipe, whichever thread the kernel hands them to.

A process-directed signal goes to any thread that does not block it.  CPython runs a Python
signal handler only in the main thread, and only when that thread next runs Python code: a
main thread blocked in waitpid(2) or a lock wakes for a signal delivered to *it* (EINTR), not
for one delivered to a helper thread, so such a handler can wait for ever.  Here the Python
handlers do nothing; CPython's C-level handler writes each signal's number to a pipe
(`signal.set_wakeup_fd`) from whatever thread it ran on, and one ordinary thread reads the pipe
and acts.  Nothing runs in a signal handler, so an action never interrupts a thread that holds
a lock.  Used by kvmgate.supervise (`kvmgate run`) and kvmgate.wrap (`kvmgate wrap`, the
libvirt keeper).
"""
from __future__ import annotations

import os
import select
import signal
import threading
from typing import Callable

QUIT = 0           # not a signal number: asks the reading thread to end


def _ignore(_sig, _frame) -> None:
    """The Python-level handler: the wakeup fd already has the signal's number."""


class SignalPipe:
    """open() (main thread) installs do-nothing handlers for `signals` and the wakeup fd;
    read() gets the numbers that arrived; close() puts the previous handlers and wakeup fd back.
    Signals that arrive before anyone reads wait in the pipe."""

    def __init__(self, signals):
        self.signals = tuple(signals)
        self._old_handlers: dict = {}
        self._old_wakeup = -1
        self._r = self._w = -1
        self._thread: threading.Thread | None = None

    def open(self) -> "SignalPipe":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers are installed from the main thread only")
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            for sig in self.signals:
                self._old_handlers[sig] = signal.signal(sig, _ignore)
            self._old_wakeup = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        except BaseException:
            self.close()
            raise
        return self

    def readable(self, timeout: float | None) -> bool:
        """Whether numbers wait in the pipe, after up to `timeout` seconds (None: for ever)."""
        return bool(select.select([self._r], [], [], timeout)[0])

    def read(self, block: bool) -> list[int]:
        """The numbers that arrived (QUIT among them after quit()); [] if none and not `block`."""
        if block:
            self.readable(None)
        try:
            return list(os.read(self._r, 4096))
        except BlockingIOError:
            return []

    def quit(self) -> None:
        """Wake the reader with QUIT."""
        try:
            os.write(self._w, bytes([QUIT]))
        except OSError:
            pass

    def serve(self, actions: dict[int, Callable[[int], None]], name: str) -> None:
        """A daemon thread that calls actions[sig](sig) for each number read, in order, until
        close().  An action must not raise (it would end the thread)."""
        def loop():
            while True:
                for sig in self.read(block=True):
                    if sig == QUIT:
                        return
                    action = actions.get(sig)
                    if action is not None:
                        action(sig)
        self._thread = threading.Thread(target=loop, name=name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serve()'s thread, then restore the handlers and the wakeup fd (main thread)."""
        if self._thread is not None:
            self.quit()
            self._thread.join()
            self._thread = None
        if self._w >= 0:
            signal.set_wakeup_fd(self._old_wakeup)
        for sig, h in self._old_handlers.items():
            signal.signal(sig, h if h is not None else signal.SIG_DFL)
        self._old_handlers = {}
        for fd in (self._r, self._w):
            if fd >= 0:
                os.close(fd)
        self._r = self._w = -1


__all__ = ["QUIT", "SignalPipe"]
