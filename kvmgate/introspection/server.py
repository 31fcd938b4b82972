"""The KVM side of KVMI on one connected socket (spec §2 commands, §3 events).

A reader thread answers commands (whether or not the guest runs) and hands event replies to the
vCPU thread waiting in `send_event`.  Anything malformed, oversized or out of order closes the
connection: waiting vCPUs are released with CONTINUE, every MSR interception is undone and
`on_close(reason)` tells the owner.  Nothing a tool sends can raise out of the reader thread.

Ids the owner may allow but this server does not implement (the spec's "for reference" ids)
get -KVM_ENOSYS, as the kernel answers any id it has no handler for, and VM_CHECK_COMMAND
reports them -KVM_ENOENT, so a tool probing features sees a kernel without those handlers.
(-KVM_EOPNOTSUPP means "known, but not possible now", e.g. VCPU_SET_REGISTERS outside an event.)
Likewise events we never send (all but UNHOOK, PAUSE, MSR) are unknown to VM_CHECK_EVENT
(-KVM_ENOENT) and VCPU_CONTROL_EVENTS (-KVM_EINVAL).  PAUSE may be enabled/disabled per vCPU
but is sent once per successful VM_PAUSE_VCPU regardless (while allowed), as in KVMI.

Where the spec is silent: `enable`/`wait` flags above 1 are -KVM_EINVAL; a variable-length tail
(write data, msrs[]) shorter than its count is -KVM_EINVAL; more MSRs than fit one reply (481)
is -KVM_E2BIG; a backend exception is -KVM_E<errno> for an OSError carrying a KVM code, else
-KVM_EFAULT.  Event replies: a short payload reads as zero, an unknown action or a reply
naming another event closes the connection like a wrong seq.
"""
from __future__ import annotations

import itertools
import logging
import socket
import struct
import threading
from typing import Callable, NamedTuple

from ..uapi import U64
from . import ids
from .backend import Backend
from .ids import CONTINUE, Action
from .permissions import Permissions
from .protocol import (CHECK_REQ, CONTROL_EVENTS_REQ, CONTROL_MSR_REQ, GET_INFO_RPL, GET_REGS_REQ,
                       MAX_GET_REGS_MSRS, MAX_MSG_SIZE, MSR_REPLY, PAGE_SIZE, PAUSE_REQ,
                       READ_PHYS_REQ, REGS_SIZE, REPLY_SIZES, VCPU_HDR, VCPU_INFO_RPL, VERSION,
                       VERSION_RPL, WRITE_PHYS_REQ, Message, ProtocolError, Reader, fixed,
                       msr_valid, pack_get_regs_reply, pack_msr_event, pack_reply, pack_vcpu_event,
                       pack_vm_event, parse_event_reply, state_bytes)

__all__ = ["Backend", "Introspection", "IntrospectionServer", "EventResult", "SUPPORTED_EVENTS"]

log = logging.getLogger("kvmgate.introspection")

MAX_PAUSE_REQUESTS = 1000   # pending PAUSE events per vCPU before VM_PAUSE_VCPU gets -KVM_EBUSY
SUPPORTED_VM_EVENTS = frozenset({ids.VM_EVENT_UNHOOK})
SUPPORTED_VCPU_EVENTS = frozenset({ids.VCPU_EVENT_PAUSE, ids.VCPU_EVENT_MSR})
SUPPORTED_EVENTS = SUPPORTED_VM_EVENTS | SUPPORTED_VCPU_EVENTS
KVM_CODES = frozenset(ids.ERROR_NAMES)
_ACTIONS = tuple(Action)

EINVAL, EPERM, ENOENT = -ids.KVM_EINVAL, -ids.KVM_EPERM, -ids.KVM_ENOENT
OK = (0, b"")


class EventResult(NamedTuple):
    """The tool's answer to an event; `delivered` False = no answer (not sent, or released)."""
    action: Action
    data: bytes
    delivered: bool


RELEASED = EventResult(CONTINUE, b"", False)


class _Waiter:
    """One vCPU blocked in send_event."""
    __slots__ = ("seq", "event", "reply_size", "done", "action", "data", "regs")

    def __init__(self, seq: int, event: int, reply_size: int):
        self.seq, self.event, self.reply_size = seq, event, reply_size
        self.done = threading.Event()
        self.action: Action | None = None
        self.data = b""
        self.regs: bytes | None = None


def _error_code(exc: BaseException) -> int:
    err = getattr(exc, "errno", None)
    return -err if isinstance(err, int) and err in KVM_CODES else -ids.KVM_EFAULT


class IntrospectionServer:
    """KVMI on a connected stream socket that this object owns (and closes)."""

    def __init__(self, sock: socket.socket, backend: Backend, permissions: Permissions, *,
                 on_close: Callable[[str], None] | None = None,
                 event_timeout: float | None = None, name: str = "kvmi"):
        self._sock = sock
        self._backend = backend
        self._perms = permissions
        self._on_close = on_close
        self._event_timeout = event_timeout
        self._reader = Reader(sock)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._closed = False
        self._seq = itertools.count(1)
        self._vm_events: set[int] = set()
        self._vcpu_events: dict[int, set[int]] = {}
        self._msrs: dict[int, set[int]] = {}
        self._pauses: dict[int, int] = {}
        self._waiting: dict[int, _Waiter] = {}
        self._vcpu_locks: dict[int, threading.Lock] = {}
        self.close_reason: str | None = None
        self.messages = 0
        self.handler_errors: list[tuple[str, BaseException]] = []   # last few, for diagnosis
        self.internal_errors: list[BaseException] = []               # bugs caught by the net
        self._handlers = {
            ids.GET_VERSION: self._get_version,
            ids.VM_CHECK_COMMAND: self._check_command,
            ids.VM_CHECK_EVENT: self._check_event,
            ids.VM_GET_INFO: self._get_info,
            ids.VM_CONTROL_EVENTS: self._vm_control_events,
            ids.VM_READ_PHYSICAL: self._read_physical,
            ids.VM_WRITE_PHYSICAL: self._write_physical,
            ids.VM_PAUSE_VCPU: self._pause_vcpu,
        }
        self._vcpu_handlers = {
            ids.VCPU_GET_INFO: self._vcpu_get_info,
            ids.VCPU_CONTROL_EVENTS: self._vcpu_control_events,
            ids.VCPU_GET_REGISTERS: self._vcpu_get_registers,
            ids.VCPU_SET_REGISTERS: self._vcpu_set_registers,
            ids.VCPU_CONTROL_MSR: self._vcpu_control_msr,
        }
        self.implemented = frozenset(self._handlers) | frozenset(self._vcpu_handlers)
        self._thread = threading.Thread(target=self._run, name=f"{name}-reader", daemon=True)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> "IntrospectionServer":
        self._thread.start()
        return self

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, reason: str = "closed") -> bool:
        """Shut the socket both ways, release waiting vCPUs, undo interceptions.  Idempotent."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            self.close_reason = reason
            waiters = list(self._waiting.values())
            self._waiting.clear()
            controlled = [(v, m) for v, ms in self._msrs.items() for m in ms]
            self._msrs.clear()
            self._vcpu_events.clear()
            self._vm_events.clear()
            self._pauses.clear()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._thread.ident is None:   # never started: nobody else will close it
            self._sock.close()
        for w in waiters:
            w.done.set()
        for vcpu, msr in controlled:
            self._undo_msr(vcpu, msr)
        log.info("introspection connection closed: %s", reason)
        if self._on_close is not None:
            try:
                self._on_close(reason)
            except Exception:
                log.exception("on_close callback failed")
        return True

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the reader thread (not from the reader thread itself); True if it ended."""
        if threading.current_thread() is self._thread:
            return False
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def on_reader_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until the tool closes its end (or the connection is closed otherwise)."""
        if threading.current_thread() is self._thread:
            return self._closed
        return self.join(timeout)

    def _run(self) -> None:
        reason = "EOF"
        try:
            while not self._closed:
                try:
                    msg = self._reader.read()
                except ProtocolError as exc:
                    reason = f"protocol error: {exc}"
                    break
                except OSError as exc:
                    reason = f"socket error: {exc}"
                    break
                if msg is None:
                    break
                self.messages += 1
                if msg.id == ids.MSG_VCPU_EVENT:
                    bad = self._event_reply(msg)
                    if bad:
                        reason = f"protocol error: {bad}"
                        break
                else:
                    self._command(msg)
        except Exception as exc:   # a bug of ours: close, never let it escape the thread
            self.internal_errors.append(exc)
            log.exception("introspection reader failed")
            reason = f"internal error: {exc!r}"
        finally:
            self.close(reason)
            with self._send_lock:
                self._sock.close()

    def _send(self, data: bytes) -> bool:
        try:
            with self._send_lock:
                self._sock.sendall(data)
            return True
        except OSError as exc:
            self.close(f"send failed: {exc}")
            return False

    def _undo_msr(self, vcpu: int, msr: int) -> None:
        try:
            self._backend.control_msr(vcpu, msr, False)
        except Exception:
            log.exception("undoing MSR %#x interception on vCPU %d failed", msr, vcpu)

    # --- commands (reader thread) ---------------------------------------------------------

    def _command(self, msg: Message) -> None:
        mid, payload = msg.id, msg.payload
        handler = self._handlers.get(mid)
        vcpu_handler = None if handler is not None else self._vcpu_handlers.get(mid)
        if handler is None and vcpu_handler is None:
            err, data = -ids.KVM_ENOSYS, b""
        elif not self._perms.command_allowed(mid):
            err, data = EPERM, b""
        else:
            try:
                if handler is not None:
                    err, data = handler(payload)
                else:
                    vcpu, p1, p2 = fixed(VCPU_HDR, payload)
                    if p1 or p2 or vcpu >= self._backend.vcpu_count():
                        err, data = EINVAL, b""
                    else:
                        err, data = vcpu_handler(vcpu, payload[VCPU_HDR.size:])
                if err > 0:
                    err = -err
            except Exception as exc:
                err, data = _error_code(exc), b""
                self.handler_errors[:] = self.handler_errors[-15:] + [(ids.command_name(mid), exc)]
                log.warning("%s failed: %r", ids.command_name(mid), exc)
        self._send(pack_reply(mid, msg.seq, err, data))

    def _get_version(self, p: bytes):
        return 0, VERSION_RPL.pack(VERSION, MAX_MSG_SIZE, bytes(8))

    def _check_command(self, p: bytes):
        cid, p1, p2 = fixed(CHECK_REQ, p)
        if p1 or p2:
            return EINVAL, b""
        if cid not in self.implemented:
            return ENOENT, b""
        return (0 if self._perms.command_allowed(cid) else EPERM), b""

    def _check_event(self, p: bytes):
        eid, p1, p2 = fixed(CHECK_REQ, p)
        if p1 or p2:
            return EINVAL, b""
        if eid not in SUPPORTED_EVENTS:
            return ENOENT, b""
        return (0 if self._perms.event_allowed(eid) else EPERM), b""

    def _get_info(self, p: bytes):
        return 0, GET_INFO_RPL.pack(self._backend.vcpu_count())

    def _control_request(self, p: bytes, supported) -> tuple[int, int, int]:
        """(error, event id, enable) of a {VM,VCPU}_CONTROL_EVENTS request: -KVM_EINVAL for
        padding, enable > 1 or an event outside `supported`; -KVM_EPERM when disallowed."""
        eid, enable, p1, p2 = fixed(CONTROL_EVENTS_REQ, p)
        if p1 or p2 or enable > 1 or eid not in supported:
            return EINVAL, eid, enable
        if not self._perms.event_allowed(eid):
            return EPERM, eid, enable
        return 0, eid, enable

    def _vm_control_events(self, p: bytes):
        err, eid, enable = self._control_request(p, SUPPORTED_VM_EVENTS)
        if err:
            return err, b""
        with self._lock:
            if enable:
                self._vm_events.add(eid)
            else:
                self._vm_events.discard(eid)
        return OK

    @staticmethod
    def _bad_range(gpa: int, size: int) -> bool:
        return size == 0 or (gpa & (PAGE_SIZE - 1)) + size > PAGE_SIZE

    def _read_physical(self, p: bytes):
        gpa, size, p1, p2 = fixed(READ_PHYS_REQ, p)
        if p1 or p2 or self._bad_range(gpa, size):
            return EINVAL, b""
        data = self._backend.read_physical(gpa, size)
        if data is None:
            return ENOENT, b""
        if len(data) != size:
            raise ValueError(f"backend read {len(data)} bytes, not {size}")
        return 0, bytes(data)

    def _write_physical(self, p: bytes):
        gpa, size, p1, p2 = fixed(WRITE_PHYS_REQ, p)
        data = p[WRITE_PHYS_REQ.size:WRITE_PHYS_REQ.size + size]
        if p1 or p2 or self._bad_range(gpa, size) or len(data) < size:
            return EINVAL, b""
        return (0 if self._backend.write_physical(gpa, bytes(data)) else ENOENT), b""

    def _pause_vcpu(self, p: bytes):
        vcpu, wait, p1, p2 = fixed(PAUSE_REQ, p)
        if p1 or p2 or wait > 1 or vcpu >= self._backend.vcpu_count():
            return EINVAL, b""
        if not self._perms.event_allowed(ids.VCPU_EVENT_PAUSE):
            return EPERM, b""
        with self._lock:
            n = self._pauses.get(vcpu, 0)
            if n >= MAX_PAUSE_REQUESTS:
                return -ids.KVM_EBUSY, b""
            self._pauses[vcpu] = n + 1
        try:
            err = self._backend.pause_vcpu(vcpu, bool(wait)) or 0
        except Exception:
            self._take_pause(vcpu)
            raise
        if err:
            self._take_pause(vcpu)
        return err, b""

    def _vcpu_get_info(self, vcpu: int, p: bytes):
        return 0, VCPU_INFO_RPL.pack(((self._backend.tsc_khz() or 0) * 1000) & U64)

    def _vcpu_control_events(self, vcpu: int, p: bytes):
        err, eid, enable = self._control_request(p, SUPPORTED_VCPU_EVENTS)
        if err:
            return err, b""
        with self._lock:
            if self._closed:
                return OK
            evs = self._vcpu_events.setdefault(vcpu, set())
            if enable:
                evs.add(eid)
            else:
                evs.discard(eid)
        return OK

    def _vcpu_get_registers(self, vcpu: int, p: bytes):
        nmsrs, p1, p2 = fixed(GET_REGS_REQ, p)
        if p1 or p2:
            return EINVAL, b""
        if nmsrs > MAX_GET_REGS_MSRS:
            return -ids.KVM_E2BIG, b""
        tail = p[GET_REGS_REQ.size:GET_REGS_REQ.size + 4 * nmsrs]
        if len(tail) < 4 * nmsrs:
            return EINVAL, b""
        msrs = struct.unpack(f"={nmsrs}I", tail)
        mode, regs, sregs, values = self._backend.get_registers(vcpu, msrs)
        if len(values) != nmsrs:
            return EINVAL, b""
        return 0, pack_get_regs_reply(mode, regs, sregs, values)

    def _vcpu_set_registers(self, vcpu: int, p: bytes):
        regs = bytes(p[:REGS_SIZE]).ljust(REGS_SIZE, b"\0")
        with self._lock:
            w = self._waiting.get(vcpu)
            if w is None:
                return -ids.KVM_EOPNOTSUPP, b""
            w.regs = regs   # applied on the vCPU thread once the event reply arrives
        return OK

    def _vcpu_control_msr(self, vcpu: int, p: bytes):
        enable, p1, p2, msr = fixed(CONTROL_MSR_REQ, p)
        if p1 or p2 or enable > 1:
            return EINVAL, b""
        if not self._perms.event_allowed(ids.VCPU_EVENT_MSR):
            return EPERM, b""
        if not msr_valid(msr):
            return EINVAL, b""
        current = self._msrs.get(vcpu, ())
        if bool(enable) == (msr in current):
            return OK
        err = self._backend.control_msr(vcpu, msr, bool(enable)) or 0
        if err:
            return err, b""
        with self._lock:
            late = self._closed and enable
            if not self._closed:
                msrs = self._msrs.setdefault(vcpu, set())
                if enable:
                    msrs.add(msr)
                else:
                    msrs.discard(msr)
        if late:   # closed while we enabled it: close() could not see it, undo it here
            self._undo_msr(vcpu, msr)
        return OK

    # --- events (vCPU threads) ------------------------------------------------------------

    def _event_reply(self, msg: Message) -> str | None:
        """Hand a reply to its waiting vCPU; return why the connection must close, if it must."""
        try:
            r = parse_event_reply(msg.payload)
        except ProtocolError as exc:
            return str(exc)
        with self._lock:
            w = self._waiting.get(r.vcpu)
            if w is None:
                return f"event reply for vCPU {r.vcpu}, which waits for none"
            if msg.seq != w.seq:
                return f"event reply seq {msg.seq}, expected {w.seq}"
            if r.event != w.event:
                return f"reply to event {r.event}, expected {w.event}"
            if r.action >= len(_ACTIONS):
                return f"unknown action {r.action}"
            if len(r.data) > w.reply_size:
                return f"event reply of {len(r.data)} bytes > {w.reply_size}"
            del self._waiting[r.vcpu]
        w.data = r.data.ljust(w.reply_size, b"\0")
        w.action = _ACTIONS[r.action]
        w.done.set()
        return None

    def _deliver(self, vcpu: int, event: int, build: Callable[[int], bytes],
                 reply_size: int) -> EventResult:
        """Send build(seq) and block until the matching reply, a close, or the event timeout."""
        lock = self._vcpu_locks.get(vcpu)
        if lock is None:
            lock = self._vcpu_locks.setdefault(vcpu, threading.Lock())
        with lock:
            seq = next(self._seq) & 0xFFFFFFFF
            w = _Waiter(seq, event, reply_size)
            data = build(seq)
            with self._lock:
                if self._closed:
                    return RELEASED
                self._waiting[vcpu] = w
            if not self._send(data):
                return RELEASED
            if not w.done.wait(self._event_timeout):
                self.close(f"no reply to {ids.event_name(event)} on vCPU {vcpu} "
                           f"within {self._event_timeout}s")
            if w.action is None:
                return RELEASED
            if w.regs is not None:
                try:
                    self._backend.set_registers(vcpu, w.regs)
                except Exception:
                    log.exception("VCPU_SET_REGISTERS on vCPU %d failed", vcpu)
            return EventResult(w.action, w.data, True)

    def send_event(self, vcpu: int, event: int, payload: bytes = b"", state=None) -> EventResult:
        """Send a vCPU event if allowed and wait for the reply (on the vCPU thread).

        `state`: the 536-byte block, a VcpuState, or a callable returning one (called only if
        the event is sent).  Not connected or not allowed: RELEASED (CONTINUE, not delivered).
        """
        if self._closed or not self._perms.event_allowed(event):
            return RELEASED
        st = state_bytes(state)
        reply_size = REPLY_SIZES.get(event, 0)
        return self._deliver(vcpu, event,
                             lambda seq: pack_vcpu_event(seq, event, vcpu, st, payload),
                             reply_size)

    def msr_event(self, vcpu: int, msr: int, old: int, new: int, state=None) -> tuple[Action, int]:
        """A guest write of `new` to `msr` (currently `old`): (action, value to write).

        CONTINUE: write the returned value (the tool's); RETRY/CRASH: the value is `old`.
        No event (not controlled, not enabled, not allowed, unchanged, no tool): (CONTINUE, new).
        """
        if old == new or self._closed:
            return CONTINUE, new
        msrs = self._msrs.get(vcpu)
        if not msrs or msr not in msrs:
            return CONTINUE, new
        evs = self._vcpu_events.get(vcpu)
        if not evs or ids.VCPU_EVENT_MSR not in evs \
                or not self._perms.event_allowed(ids.VCPU_EVENT_MSR):
            return CONTINUE, new
        st = state_bytes(state)
        old &= U64
        new &= U64
        res = self._deliver(vcpu, ids.VCPU_EVENT_MSR,
                            lambda seq: pack_msr_event(seq, vcpu, st, msr, old, new),
                            MSR_REPLY.size)
        if not res.delivered:
            return CONTINUE, new
        if res.action == CONTINUE:
            return CONTINUE, MSR_REPLY.unpack(res.data)[0]
        return res.action, old

    def msr_wanted(self, vcpu: int, msr: int) -> bool:
        """Whether a guest write to `msr` on `vcpu` would be sent to the tool (if it changes the
        value): controlled, MSR event enabled on that vCPU and allowed, connection open."""
        if self._closed:
            return False
        msrs = self._msrs.get(vcpu)
        if not msrs or msr not in msrs:
            return False
        evs = self._vcpu_events.get(vcpu)
        return bool(evs) and ids.VCPU_EVENT_MSR in evs \
            and self._perms.event_allowed(ids.VCPU_EVENT_MSR)

    def _take_pause(self, vcpu: int) -> bool:
        with self._lock:
            n = self._pauses.get(vcpu, 0)
            if n == 0:
                return False
            if n == 1:
                del self._pauses[vcpu]
            else:
                self._pauses[vcpu] = n - 1
            return True

    def pending_pauses(self, vcpu: int) -> int:
        return self._pauses.get(vcpu, 0)

    def pause_event(self, vcpu: int, state=None) -> Action:
        """Consume one VM_PAUSE_VCPU request and send its PAUSE event; the tool's action."""
        if not self._take_pause(vcpu):
            return CONTINUE
        return self.send_event(vcpu, ids.VCPU_EVENT_PAUSE, b"", state).action

    def handle_pauses(self, vcpu: int, state=None) -> Action:
        """Send every pending PAUSE event of `vcpu`; CRASH if any reply says so."""
        action = CONTINUE
        while self._pauses.get(vcpu):
            if self.pause_event(vcpu, state) == ids.CRASH:
                action = ids.CRASH
        return action

    def send_unhook_event(self) -> bool:
        """VM_EVENT_UNHOOK, if the tool enabled it and it is allowed; no reply expected."""
        if self._closed or ids.VM_EVENT_UNHOOK not in self._vm_events \
                or not self._perms.event_allowed(ids.VM_EVENT_UNHOOK):
            return False
        return self._send(pack_vm_event(next(self._seq) & 0xFFFFFFFF, ids.VM_EVENT_UNHOOK))

    # --- queries for the owner / the lead -------------------------------------------------

    def controlled_msrs(self, vcpu: int) -> frozenset:
        return frozenset(self._msrs.get(vcpu, ()))

    def enabled_events(self, vcpu: int | None = None) -> frozenset:
        """Events the tool enabled on `vcpu` (None: VM events)."""
        if vcpu is None:
            return frozenset(self._vm_events)
        return frozenset(self._vcpu_events.get(vcpu, ()))

    def waiting(self, vcpu: int) -> bool:
        """True while `vcpu` is blocked waiting for an event reply."""
        return vcpu in self._waiting


# The owner object lives in owner.py (which imports this module lazily); re-exported here.
from .owner import Introspection  # noqa: E402
