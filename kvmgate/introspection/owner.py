"""The VM owner's side: hook/unhook a tool and decide what it may use (docs/introspection.md,
the permission ioctls of the KVMI series).

Error order follows the seed's kernel: EPERM (introspection disabled) first, then argument
errors (EINVAL), then state (EEXIST already hooked / EFAULT not hooked), then EPERM for
disallowing an always-allowed command.

As in the kernel, a tool that disconnects or breaks the protocol does not unhook the VM: the
connection is closed, waiting vCPUs are released and interceptions undone at once, `on_close`
is called, and `hooked` stays True (hook() gives EEXIST) until the owner calls `unhook()`,
which `on_close` may do.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import uuid as _uuid
from typing import Callable

from ..errors import KvmError
from . import ids
from .ids import CONTINUE, Action
from .abi import V12, Dialect
from .permissions import IOCTL_COMMAND, IOCTL_EVENT, Permissions, check_feature
from .server import RELEASED, IntrospectionServer

log = logging.getLogger("kvmgate.introspection")

IOCTL_HOOK = "KVM_INTROSPECTION_HOOK"
IOCTL_UNHOOK = "KVM_INTROSPECTION_UNHOOK"
JOIN_TIMEOUT = 5.0


class Introspection:
    """Attached to a VM as `machine.introspection`; `backend` is the live VM (see backend.py).

    The vCPU-thread entry points (`msr_event`, `handle_pauses`, `send_event`) are cheap and
    answer CONTINUE at once when no tool is connected.
    """

    def __init__(self, backend, *, obj: object = None, enabled: bool = True,
                 on_close: Callable[[str], None] | None = None,
                 event_timeout: float | None = None):
        self.backend = backend
        self.obj = obj
        self.enabled = enabled          # False: like kvm.introspection=0 (hook/allow get EPERM)
        self.on_close = on_close        # on_close(reason), from whichever thread closed
        self.event_timeout = event_timeout
        self.uuid: bytes | None = None
        self._lock = threading.Lock()
        self._server = None
        self._perms: Permissions | None = None

    # --- state ----------------------------------------------------------------------------

    @property
    def hooked(self) -> bool:
        return self._server is not None

    @property
    def connected(self) -> bool:
        srv = self._server
        return srv is not None and not srv.closed

    @property
    def server(self):
        return self._server

    @property
    def permissions(self) -> Permissions | None:
        return self._perms

    # --- owner operations -----------------------------------------------------------------

    def hook(self, sock, uuid, *, commands=(), events=(), abi: Dialect = V12) -> None:
        """KVM_INTROSPECTION_HOOK: serve the tool on `sock` (a connected stream socket or fd).

        The socket is duplicated (the caller may close its own) and put in blocking mode.
        `commands`/`events`: ids (or -1) to allow before the tool's first message is read, as
        allow_command(id, 1)/allow_event(id, 1) right after hooking would, without the race.
        `abi`: the wire dialect of this session (abi.V12 or abi.V7); permissions are given in
        v12 ids whatever the dialect (they apply by meaning).
        """
        with self._lock:
            if not self.enabled:
                raise KvmError(errno.EPERM, IOCTL_HOOK, self.obj, "introspection is disabled")
            if self._server is not None:
                raise KvmError(errno.EEXIST, IOCTL_HOOK, self.obj, "already hooked")
            raw_uuid = _uuid_bytes(uuid, self.obj)
            s = _stream_socket(sock, self.obj)
            perms = Permissions(self.obj)
            for cid in commands:
                perms.allow_command(cid, 1)
            for eid in events:
                perms.allow_event(eid, 1)
            srv = IntrospectionServer(s, self.backend, perms, on_close=self._closed,
                                      event_timeout=self.event_timeout,
                                      name=f"kvmi-{_uuid.UUID(bytes=raw_uuid)}", abi=abi)
            self._perms, self._server, self.uuid = perms, srv, raw_uuid
            srv.start()

    def unhook(self, wait: float = 0.0) -> bool:
        """KVM_INTROSPECTION_UNHOOK.  False if not hooked (not an error, as in the kernel).

        Sends VM_EVENT_UNHOOK if the tool enabled it; then, with `wait` > 0, gives the tool
        up to `wait` seconds to close its end (interceptions stay active meanwhile); then
        shuts the socket both ways and undoes every interception.  The guest keeps running.
        """
        srv = self._server
        if srv is None:
            return False
        if srv.send_unhook_event() and wait > 0:
            srv.wait_closed(wait)
        with self._lock:
            if self._server is srv:
                self._server, self._perms, self.uuid = None, None, None
        srv.close("unhook")
        if not srv.join(JOIN_TIMEOUT) and not srv.on_reader_thread():
            log.warning("introspection reader did not stop within %ss", JOIN_TIMEOUT)
        return True

    def allow_command(self, cid: int, allow: int) -> None:
        """KVM_INTROSPECTION_COMMAND {u32 allow; s32 id}; id -1 = all."""
        self._feature(IOCTL_COMMAND, ids.COMMANDS, cid, allow)

    def allow_event(self, eid: int, allow: int) -> None:
        """KVM_INTROSPECTION_EVENT {u32 allow; s32 id}; id -1 = all."""
        self._feature(IOCTL_EVENT, ids.EVENTS, eid, allow)

    def _feature(self, ioctl: str, known: frozenset, fid: int, allow: int) -> None:
        with self._lock:
            if not self.enabled:
                raise KvmError(errno.EPERM, ioctl, self.obj, "introspection is disabled")
            check_feature(allow, fid, known, ioctl, self.obj)
            perms = self._perms
            if perms is None:
                raise KvmError(errno.EFAULT, ioctl, self.obj,
                               "the VM is not introspected (hook it first)")
            if ioctl == IOCTL_COMMAND:
                perms.allow_command(fid, allow)
            else:
                perms.allow_event(fid, allow)
                if self._server is not None:
                    self._server.publish()      # the C event path follows the permission

    def _closed(self, reason: str) -> None:
        cb = self.on_close
        if cb is not None:
            cb(reason)

    # --- vCPU-thread entry points ---------------------------------------------------------

    def msr_event(self, vcpu: int, msr: int, old: int, new: int, state=None) -> tuple[Action, int]:
        """See IntrospectionServer.msr_event; (CONTINUE, new) when no tool is connected."""
        srv = self._server
        if srv is None:
            return CONTINUE, new
        return srv.msr_event(vcpu, msr, old, new, state)

    def msr_wanted(self, vcpu: int, msr: int) -> bool:
        """Whether a write to `msr` on `vcpu` would reach the tool (cheap; vCPU threads)."""
        srv = self._server
        return srv is not None and srv.msr_wanted(vcpu, msr)

    def msr_controlled(self, vcpu: int, msr: int) -> bool:
        """Whether the tool asked for writes to `msr` on `vcpu` (VCPU_CONTROL_MSR)."""
        srv = self._server
        return srv is not None and msr in srv.controlled_msrs(vcpu)

    def pending_pauses(self, vcpu: int) -> int:
        srv = self._server
        return 0 if srv is None else srv.pending_pauses(vcpu)

    def handle_pauses(self, vcpu: int, state=None) -> Action:
        """Send the PAUSE events VM_PAUSE_VCPU asked for; CRASH if the tool says so."""
        srv = self._server
        if srv is None or not srv.pending_pauses(vcpu):
            return CONTINUE
        return srv.handle_pauses(vcpu, state)

    def send_event(self, vcpu: int, event: int, payload: bytes = b"", state=None):
        """Generic vCPU event (IntrospectionServer.send_event)."""
        srv = self._server
        return RELEASED if srv is None else srv.send_event(vcpu, event, payload, state)

    def __repr__(self) -> str:
        state = "disabled" if not self.enabled else \
            ("connected" if self.connected else "hooked" if self.hooked else "not hooked")
        return f"Introspection({self.obj!r}, {state})"


def _uuid_bytes(value, obj) -> bytes:
    if isinstance(value, _uuid.UUID):
        return value.bytes
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) == 16:
        return bytes(value)
    raise KvmError(errno.EINVAL, IOCTL_HOOK, obj, f"uuid must be 16 bytes, not {value!r}")


def _stream_socket(sock, obj) -> socket.socket:
    """A blocking duplicate of a connected stream socket; EINVAL for anything else."""
    try:
        fd = sock if isinstance(sock, int) else sock.fileno()
        dup = os.dup(fd)
    except (AttributeError, TypeError, ValueError, OSError) as exc:
        raise KvmError(errno.EINVAL, IOCTL_HOOK, obj, f"not a socket: {exc}") from None
    try:
        s = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        raise KvmError(errno.EINVAL, IOCTL_HOOK, obj, "not a socket") from None
    try:
        if s.type != socket.SOCK_STREAM:
            raise KvmError(errno.EINVAL, IOCTL_HOOK, obj, "not a stream socket")
        try:
            s.getpeername()
        except OSError:
            raise KvmError(errno.EINVAL, IOCTL_HOOK, obj, "socket not connected") from None
        s.setblocking(True)
    except BaseException:
        s.close()
        raise
    return s
