"""The socket of one KVMI session and its reader thread (docs/introspection.md §5).

`Connection` owns the connected stream socket: it starts the reader thread, which serves the
socket's reader token (inbox.py) until the connection ends, sends whole messages under one
lock, shuts the socket down when the session closes, and closes it once no thread reads it.
Whatever ends the connection (EOF, a protocol error, a failed send, a bug of ours) is reported
to `on_end(reason)`, the session's close; nothing escapes the reader thread.
"""
from __future__ import annotations

import logging
import socket
import threading
from typing import Callable

from .inbox import Inbox
from .protocol import Message

__all__ = ["Connection"]

log = logging.getLogger("kvmgate.introspection")


class Connection:
    """A connected stream socket that this object owns (and closes), read by `handle`."""

    def __init__(self, sock: socket.socket, handle: Callable[[Message], None],
                 on_end: Callable[[str], object], name: str = "kvmi", port=None):
        self._sock = sock
        self._on_end = on_end
        self._send_lock = threading.Lock()
        self.internal_errors: list[BaseException] = []               # bugs caught by the net
        self.inbox = Inbox(sock, handle, self._internal_error, port)   # port: inbox.py
        self._thread = threading.Thread(target=self._run, name=f"{name}-reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        """Shut the socket both ways and wake every thread reading or waiting (the session is
        closing); close it here if the reader thread never started."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.inbox.stop()
        if self._thread.ident is None:   # never started: nobody else will close it
            self.inbox.finish()
            self._sock.close()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the reader thread (not from the reader thread itself); True if it ended."""
        if threading.current_thread() is self._thread:
            return False
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def on_reader_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def _run(self) -> None:
        reason = "EOF"
        try:
            reason = self.inbox.serve()
        except Exception as exc:   # a bug of ours: close, never let it escape the thread
            self._internal_error(exc)
            reason = f"internal error: {exc!r}"
        finally:
            self._on_end(reason)
            self.inbox.finish()             # once no thread reads the socket any more
            with self._send_lock:
                self._sock.close()

    def _internal_error(self, exc: BaseException) -> None:
        self.internal_errors.append(exc)
        log.error("introspection: internal error handling a message: %r", exc, exc_info=exc)

    def send(self, data: bytes) -> bool:
        try:
            with self._send_lock:
                self._sock.sendall(data)
            return True
        except OSError as exc:
            self._on_end(f"send failed: {exc}")
            return False
