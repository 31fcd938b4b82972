"""Who reads a session's socket: the thread holding the reader token (docs/introspection.md §3).

In KVMI the kernel's receiving thread reads the tool's messages and wakes the vCPU whose event
was answered.  Here the thread that waits for an event reply reads the socket itself, so the
reply reaches it with no thread hand-off:

* One thread at a time holds the token, and only the holder reads the socket.  It handles every
  message it reads, in stream order, through `handle(msg)`: a command is answered on the
  holder's thread, an event reply is handed to the thread that waits for it (`Waiter.finish`),
  whichever vCPU that is.
* A thread about to send an event calls `want()` first, then `wait(waiter)` after sending: it
  gets the token and reads until its own reply has been handled (or the connection closes, or
  its time is up), then gives the token back.  Threads waiting for replies get the token before
  the reader thread does.
* The session's reader thread (`serve`) holds the token while nobody waits for a reply: it
  sleeps in poll(2) on the socket and an eventfd, which `want()` writes to get the token from it.
  After a waiting thread gives the token back, the reader thread takes it again only once it
  has been free for LINGER seconds: while events follow each other, the reader thread stays
  out of the way (no wake-up of it per event, no contention for the GIL), and a command the
  tool sends while no vCPU waits is answered at most LINGER later (or at once by a vCPU
  waiting for an event reply meanwhile).
* `stop()` (the session closes) wakes everybody; waiting threads return at once, the holder
  returns when its recv(2) sees the socket shut down.  `finish()` (the reader thread's last act)
  closes the socket once no thread can be reading it any more.

`handle` raises ProtocolError when the connection must close; the holder then stops reading and
the reason goes back to its caller, which closes the session.

With an `EventPort` (kvmgate/introspection/fast_events.py, csrc/kvmi_event.h) the token is also
a word that a vCPU thread in C can take, send an MSR event and read its reply with, without
Python: every Python move of the token is also a move of that word (taking it fails while C
holds it; a Python thread that waits for it looks again every C_WAIT seconds, since C wakes no
Python condition), C does not take it while a Python thread wants it or the reader's buffer
holds bytes, and the reader thread lingers after C's last use as after Python's.  When C leaves
an event half done (a command came first, a kick, EOF...) the vCPU thread `adopt`s the token
and the bytes C read, and goes on as `wait` does.
"""
from __future__ import annotations

import os
import select
import socket
import threading
import time
from typing import Callable

from .protocol import Message, ProtocolError, Reader

__all__ = ["Inbox", "Waiter"]

CHUNK = 65536
LINGER = 0.005                # the token stays with the vCPU side this long after its last use
# A thread waiting for its event reply polls the socket this long (nanoseconds) before it
# sleeps in recv(2), as KVM polls a halted vCPU (halt_poll_ns, 200 us by default) before it
# schedules out: the tool's reply usually comes within that time, and waking a sleeping thread
# on another CPU costs more than the whole round trip on a nested host.  Each poll also yields
# the CPU, so a tool that runs on the same CPU is not held up.  0: no polling.  Not on a host
# (or an affinity) with a single CPU.
POLL_NS = 200_000 if len(os.sched_getaffinity(0)) > 1 else 0
TIMED_OUT = object()          # _recv: no bytes before the deadline
C_WAIT = 0.0005               # a thread waiting for a token C holds looks again this often
_READABLE = select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL


class _NoPort:
    """The token word without a C event path: only Python moves the token."""
    released_at = 0.0

    def token_take(self) -> bool:
        return True

    def token_release(self, pending: bool) -> None:
        pass

    def token_kill(self) -> bool:
        return True

    def want(self, delta: int) -> None:
        pass


_NO_PORT = _NoPort()


class Waiter:
    """One thread waiting for the reply to its event: `seq`, the event, its reply size; filled
    by `finish` (action None: released without a reply)."""
    __slots__ = ("seq", "event", "reply_size", "done", "action", "data", "regs", "thread")

    def __init__(self, seq: int, event: int, reply_size: int):
        self.seq, self.event, self.reply_size = seq, event, reply_size
        self.thread = threading.get_ident()
        self.done = False
        self.action = None
        self.data = b""
        self.regs: bytes | None = None


class Inbox:
    """The reader token of one session socket (see the module docstring)."""

    def __init__(self, sock, handle: Callable[[Message], None],
                 on_internal: Callable[[BaseException], None] | None = None, port=None):
        self._sock = sock
        self.port = port                        # EventPort (C MSR events) or None
        self._word = _NO_PORT if port is None else port     # the token word
        self._handle = handle
        self._on_internal = on_internal
        self.reader = Reader()                  # the bytes read so far; only the holder uses it
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)      # threads waiting for the token
        self._reader_cond = threading.Condition(self._lock)   # the reader thread
        self._released_at = 0.0                 # when a waiting thread last gave it back
        self._holder: int | None = None
        self._wanted = 0                        # threads between want() and the end of wait()
        self._polling = False                   # the reader thread holds the token, in poll(2)
        self._kicked = False                    # the eventfd has been written and not drained
        self._stop = False
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self._poll.register(self._efd, select.POLLIN)
        self._waiting_reads = _WaitingReads(sock, lambda: self._stop)

    # --- the reader thread ----------------------------------------------------------------

    def serve(self) -> str:
        """The reader thread's loop: hold the token whenever nobody waits for a reply, read and
        handle messages.  Returns why it ended (EOF, a protocol or socket error, a stop)."""
        me, word = threading.get_ident(), self._word
        while True:
            with self._lock:
                while True:
                    if self._stop:
                        return "closed"
                    if self._holder is None and not self._wanted:
                        idle = time.monotonic() - max(self._released_at, word.released_at)
                        if idle >= LINGER and self._take(me):
                            break
                        # (C holding it: no hurry, the next look is LINGER away too)
                        self._reader_cond.wait(LINGER - idle if idle < LINGER else LINGER)
                    else:
                        # Not woken when the token comes back (that would cost a wake-up
                        # per event): it looks again every LINGER.
                        self._reader_cond.wait(LINGER)
            try:
                reason = self._read_safely(None, None, True)
            finally:
                self._release(False)
            if reason is not None:
                return reason

    def finish(self) -> None:
        """The reader thread's last act: once nobody reads the socket, close it (and the
        eventfd).  After stop()."""
        with self._cond:
            # C never takes a dead token; while it holds one, look again every C_WAIT
            while self._holder is not None or not self._word.token_kill():
                self._cond.wait(C_WAIT if self._holder is None else None)
            self._holder = -1                   # nobody gets the token any more
        os.close(self._efd)

    # --- threads waiting for an event reply ---------------------------------------------

    def want(self) -> None:
        """Before sending an event: the next wait() will need the token."""
        with self._lock:                        # the Condition's lock (no Python-level enter)
            self._wanted += 1
            self._word.want(1)                  # C leaves the token to us from now on
            if self._polling and not self._kicked:
                self._kicked = True
                os.eventfd_write(self._efd, 1)

    def wait(self, w: Waiter, timeout: float | None) -> str | None:
        """After want() and sending the event `w` waits for: read (holding the token) until `w`
        is finished.  Returns None, or why the connection must close (a protocol or socket
        error, EOF, or "timeout" when no reply came within `timeout` seconds)."""
        me = threading.get_ident()
        cond = self._cond
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:                        # cond's lock
            try:
                nested = self._holder == me     # sent from inside a handler of the holder
                if not nested:
                    while True:
                        if w.done or self._stop:
                            return None
                        if self._take(me):
                            break
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            return "timeout"
                        if self._holder is None:        # C holds it: no wake-up will come
                            left = C_WAIT if left is None else min(left, C_WAIT)
                        cond.wait(left)
            finally:
                self._wanted -= 1
                self._word.want(-1)
        try:
            return self._read_safely(w, deadline, False)
        finally:
            if not nested:
                self._release(True)

    def adopt(self, w: Waiter, data: bytes, deadline: float | None) -> str | None:
        """A vCPU thread whose event C sent and left half done (the token C took is now this
        thread's, `data` the bytes C read of the socket): read until `w` is finished, as wait()
        does.  Returns None or why the connection must close."""
        me = threading.get_ident()
        with self._lock:
            self.port.token_adopt()
            self._holder = me
        try:
            self.reader.feed(data)
            return self._read_safely(w, deadline, False)
        finally:
            self._release(True)

    def finish_waiter(self, w: Waiter) -> None:
        """Mark `w` finished (its reply was handled, or it is released) and wake it."""
        if w.thread == self._holder == threading.get_ident():
            w.done = True                       # its own thread read it: nobody to wake
            return
        with self._cond:
            w.done = True
            self._cond.notify_all()

    def stop(self) -> None:
        """The session is closing: wake every waiting thread and the reader thread."""
        with self._lock:
            self._stop = True
            self._cond.notify_all()
            self._reader_cond.notify_all()
            if not self._kicked and self._holder != -1:
                self._kicked = True
                os.eventfd_write(self._efd, 1)

    # --- the holder -------------------------------------------------------------------------

    def _take(self, me: int) -> bool:
        """Under the lock: the token is free (for C too, with a port) and now `me`'s."""
        if self._holder is not None or not self._word.token_take():
            return False
        self._holder = me
        return True

    def _release(self, linger: bool) -> None:
        with self._lock:
            self._holder = None
            self._word.token_release(self.reader.pending() > 0)   # C: only with nothing buffered
            if linger:
                self._released_at = time.monotonic()
            if self._wanted or self._stop:
                self._cond.notify_all()

    def _read_safely(self, w: Waiter | None, deadline, reader_thread: bool) -> str | None:
        """_read, with whatever it raises turned into the reason to close."""
        try:
            if reader_thread:
                return self._read_as_reader()
            return self._read_for(w, deadline)
        except ProtocolError as exc:
            return f"protocol error: {exc}"
        except OSError as exc:
            return f"socket error: {exc}"
        except Exception as exc:        # a bug of ours: close the session, never raise it
            if self._on_internal is not None:
                self._on_internal(exc)
            return f"internal error: {exc!r}"

    def _read_as_reader(self) -> str | None:
        """The reader thread, holding the token: handle messages until a waiting thread wants
        the token (or the session stops)."""
        reader = self.reader
        while True:
            if self._wanted > 0 or self._stop:
                return None
            msg = reader.next()
            if msg is not None:
                self._handle(msg)
                continue
            data = self._poll_recv()
            if data is None:            # asked for the token
                continue
            if not data:
                return self._eof()
            reader.feed(data)

    def _read_for(self, w: Waiter, deadline: float | None) -> str | None:
        """A thread waiting for `w`'s reply, holding the token: handle messages until `w` is
        finished.  The event path: a reply that arrives alone skips the reader's buffer."""
        reader, handle, recv = self.reader, self._handle, self._sock.recv
        while not w.done:
            msg = reader.next()
            if msg is None:
                if self._stop:
                    return "closed"
                data = self._waiting_reads.poll_briefly() if POLL_NS else None
                if data is not None:
                    pass
                elif deadline is None:
                    data = recv(CHUNK)
                else:
                    data = self._waiting_reads.recv(deadline)
                    if data is TIMED_OUT:
                        return "timeout"
                if not data:
                    return self._eof()
                msg = reader.take(data)
                if msg is None:
                    continue
            handle(msg)
        return None

    def _eof(self) -> str:
        if self.reader.pending():
            raise ProtocolError(f"EOF inside a message ({self.reader.pending()} bytes)")
        return "EOF"

    def _poll_recv(self) -> bytes | None:
        """The reader thread: sleep in poll(2) until the socket is readable (its bytes) or a
        waiting thread wants the token (None)."""
        with self._cond:
            if self._wanted or self._stop:
                return None
            self._polling = True
        try:
            events = self._poll.poll()
        finally:
            with self._cond:
                self._polling = False
        sock_ready = False
        for fd, ev in events:
            if fd == self._efd:
                with self._cond:
                    try:
                        os.eventfd_read(self._efd)
                    except BlockingIOError:
                        pass
                    self._kicked = False
            elif ev & _READABLE:
                sock_ready = True
        if not sock_ready:
            return None
        return self._sock.recv(CHUNK)


class _WaitingReads:
    """How a thread waiting for its event reply reads the socket (holding the token)."""

    def __init__(self, sock, stopped: Callable[[], bool]):
        self._sock = sock
        self._stopped = stopped
        self._poll = select.poll()              # with a deadline
        self._poll.register(sock.fileno(), select.POLLIN)

    def poll_briefly(self) -> bytes | None:
        """Before sleeping: the socket's bytes if some arrive within POLL_NS (non-blocking
        recv(2) and sched_yield(2) in turn), else None."""
        recv, yield_cpu, now = self._sock.recv, os.sched_yield, time.perf_counter_ns
        end = now() + POLL_NS
        while True:
            try:
                return recv(CHUNK, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if now() >= end or self._stopped():
                    return None
                yield_cpu()

    def recv(self, deadline: float | None):
        """recv(2) (blocking), or TIMED_OUT past `deadline`."""
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not self._poll.poll(max(1, int(left * 1000))):
                return TIMED_OUT
        return self._sock.recv(CHUNK)
