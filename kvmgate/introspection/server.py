"""The KVM side of KVMI on one connected socket (docs/introspection.md: commands, events).

One server speaks one wire dialect (`abi.V12` or `abi.V7`, see abi.py); everything below is
the same for both, by meaning: handlers are per `abi.Op`, permissions per v12 command/event.

Messages are read by the thread holding the session's reader token (inbox.py): a vCPU thread
waiting in `send_event` reads the socket itself until its reply comes, answering the commands
and handing over the other vCPUs' replies it meets on the way; the reader thread reads
whenever no vCPU waits, so commands are answered whether or not the guest runs.  Anything
malformed, oversized or out of order closes the
connection: waiting vCPUs are released with CONTINUE, every MSR interception is undone and
`on_close(reason)` tells the owner.  Nothing a tool sends can raise out of the reader thread or
into a vCPU thread.

Closing rules (KVMI's: the kernel ends the receiving thread on these):
* a message id the dialect does not know at all;
* a command payload shorter than its fixed request (after the vCPU header), or a
  variable-length tail (write data, msrs[]) shorter than its count;
* an event reply with a wrong seq, vCPU, event, action, padding or an over-long payload.
Longer command payloads are accepted (extra bytes ignored); a short event reply payload reads
as zero (the kernel's rule for replies).

Commands the dialect knows but kvmgate cannot serve (`Op.UNSERVED`: e.g. CONTROL_CR, page
access, XSAVE; KVM gives user space no exit for CR or page-fault events) get the dialect's
"unsupported" reply (v12 -KVM_ENOSYS, kvmi-v7 -KVM_EOPNOTSUPP) and the session stays in step;
CHECK_COMMAND reports them -KVM_ENOENT.  Events never sent (all but UNHOOK, PAUSE, MSR) are
unknown to CHECK_EVENT (-KVM_ENOENT) and CONTROL_EVENTS (-KVM_EINVAL).  PAUSE may be
enabled/disabled per vCPU but is sent once per successful PAUSE_VCPU regardless (while
allowed), as in KVMI.

kvmi-v7 batches: CONTROL_CMD_RESPONSE {enable, now} turns command replies off (enable=0) and
back on; `now` says whether the change applies before or after its own reply.  While replies
are off, results are dropped, except -KVM_EPERM for a PAUSE_VCPU whose event is disallowed
(the kernel sends that one anyway).

Where the spec is silent: `enable`/`wait` flags above 1 are -KVM_EINVAL; more MSRs than fit
one reply (481) is -KVM_E2BIG; a backend exception is -KVM_E<errno> for an OSError carrying a
KVM code, else -KVM_EFAULT.
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
from .abi import V12, V7_CMD_RESPONSE_REQ, V7_MAX_GFN_RPL, Dialect, Op
from .backend import Backend
from .ids import CONTINUE, Action, Event
from .inbox import Inbox, Waiter
from .permissions import Permissions
from .protocol import (CHECK_REQ, CONTROL_EVENTS_REQ, CONTROL_MSR_REQ, GET_CPUID_REQ,
                       GET_CPUID_RPL, GET_INFO_RPL, GET_REGS_REQ, INJECT_REQ, MAX_GET_REGS_MSRS,
                       MSR_EVENT, MSR_REPLY, PAGE_SIZE, REGS_SIZE, REPLY_SIZES, STATE_SIZE,
                       VCPU_HDR, VCPU_INFO_RPL, Message, ProtocolError, msr_valid,
                       pack_get_regs_reply, pack_reply, parse_event_reply, state_bytes)

__all__ = ["Backend", "IntrospectionServer", "EventResult", "SUPPORTED_EVENTS", "RELEASED"]

log = logging.getLogger("kvmgate.introspection")

MAX_PAUSE_REQUESTS = 1000   # pending PAUSE events per vCPU before PAUSE_VCPU gets -KVM_EBUSY
SUPPORTED_VM_EVENTS = frozenset({Event.UNHOOK})
SUPPORTED_VCPU_EVENTS = frozenset({Event.PAUSE, Event.MSR})
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


def _error_code(exc: BaseException) -> int:
    err = getattr(exc, "errno", None)
    return -err if isinstance(err, int) and err in KVM_CODES else -ids.KVM_EFAULT


class IntrospectionServer:
    """KVMI on a connected stream socket that this object owns (and closes), in one dialect."""

    def __init__(self, sock: socket.socket, backend: Backend, permissions: Permissions, *,
                 on_close: Callable[[str], None] | None = None,
                 event_timeout: float | None = None, name: str = "kvmi", abi: Dialect = V12):
        self._sock = sock
        self._backend = backend
        self._perms = permissions
        self._on_close = on_close
        self._event_timeout = event_timeout
        self.abi = abi
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._closed = False
        self._replies_off = False       # kvmi-v7 CONTROL_CMD_RESPONSE
        self._seq = itertools.count(1)
        self._vm_events: set[int] = set()
        self._vcpu_events: dict[int, set[int]] = {}
        self._msrs: dict[int, set[int]] = {}
        self._pauses: dict[int, int] = {}
        self._waiting: dict[int, Waiter] = {}
        self._vcpu_locks: dict[int, threading.Lock] = {}
        self.close_reason: str | None = None
        self.messages = 0
        self.handler_errors: list[tuple[str, BaseException]] = []   # last few, for diagnosis
        self.internal_errors: list[BaseException] = []               # bugs caught by the net
        self._inbox = Inbox(sock, self.process, self._internal_error)
        # One handler per operation; (vcpu or None, request after the vCPU header).
        self._ops: dict[Op, Callable[[int | None, bytes], tuple[int, bytes]]] = {
            Op.GET_VERSION: self._get_version,
            Op.CHECK_COMMAND: self._check_command,
            Op.CHECK_EVENT: self._check_event,
            Op.GET_INFO: self._get_info,
            Op.CONTROL_VM_EVENTS: self._vm_control_events,
            Op.READ_PHYSICAL: self._read_physical,
            Op.WRITE_PHYSICAL: self._write_physical,
            Op.PAUSE_VCPU: self._pause_vcpu,
            Op.GET_VCPU_INFO: self._vcpu_get_info,
            Op.CONTROL_EVENTS: self._vcpu_control_events,
            Op.GET_REGISTERS: self._vcpu_get_registers,
            Op.SET_REGISTERS: self._vcpu_set_registers,
            Op.GET_CPUID: self._vcpu_get_cpuid,
            Op.INJECT_EXCEPTION: self._vcpu_inject_exception,
            Op.CONTROL_MSR: self._vcpu_control_msr,
            Op.GET_MAX_GFN: self._get_max_gfn,
        }
        # Wire ids of the commands this server serves (CHECK_COMMAND answers 0/-KVM_EPERM).
        self.implemented = frozenset(mid for mid, r in abi.routes.items()
                                     if r.op is not Op.UNSERVED)
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
        self._inbox.stop()
        if self._thread.ident is None:   # never started: nobody else will close it
            self._inbox.finish()
            self._sock.close()
        for w in waiters:
            self._inbox.finish_waiter(w)
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
            reason = self._inbox.serve()
        except Exception as exc:   # a bug of ours: close, never let it escape the thread
            self._internal_error(exc)
            reason = f"internal error: {exc!r}"
        finally:
            self.close(reason)
            self._inbox.finish()             # once no thread reads the socket any more
            with self._send_lock:
                self._sock.close()

    def _internal_error(self, exc: BaseException) -> None:
        self.internal_errors.append(exc)
        log.error("introspection: internal error handling a message: %r", exc, exc_info=exc)

    def process(self, msg: Message) -> None:
        """Handle one decoded message as the token holder does: answer a command, or hand an
        event reply to its vCPU.  ProtocolError when the connection must close."""
        self.messages += 1
        if msg.id == self.abi.reply_id:
            self._event_reply(msg)
        else:
            self._command(msg)

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
        """Answer one command; ProtocolError when the connection must close."""
        mid, payload = msg.id, msg.payload
        route = self.abi.route(mid)
        if route is None:
            raise ProtocolError(f"unknown message id {mid} ({self.abi.name})")
        # These two are answered even while replies are off (the kernel's rule).
        if route.op is Op.UNSERVED:
            return self._reply(msg, self.abi.unserved_error, force=True)
        if route.perm is not None and not self._perms.command_allowed(route.perm):
            return self._reply(msg, EPERM, force=True)
        head = VCPU_HDR.size if route.vcpu else 0
        if len(payload) < head + route.size:
            raise ProtocolError(f"{route.name}: {len(payload)} bytes, needs {head + route.size}")
        if route.op is Op.CONTROL_CMD_RESPONSE:
            return self._cmd_response(msg)
        vcpu = None
        try:
            if route.vcpu:
                vcpu, p1, p2 = VCPU_HDR.unpack_from(payload)
                if p1 or p2 or vcpu >= self._backend.vcpu_count():
                    return self._reply(msg, EINVAL)
            err, data = self._ops[route.op](vcpu, payload[head:])
            if err > 0:
                err = -err
        except ProtocolError:
            raise
        except Exception as exc:
            err, data = _error_code(exc), b""
            self.handler_errors[:] = self.handler_errors[-15:] + [(route.name, exc)]
            log.warning("%s failed: %r", route.name, exc)
        self._reply(msg, err, data, force=route.op is Op.PAUSE_VCPU and err == EPERM)

    def _reply(self, msg: Message, err: int, data: bytes = b"", force: bool = False) -> None:
        if self._replies_off and not force:
            if err:
                log.info("%s: error %s dropped (replies are off)",
                         self.abi.command_name(msg.id), ids.error_name(err))
            return
        self._send(pack_reply(msg.id, msg.seq, err, data))

    def _cmd_response(self, msg: Message) -> None:
        """kvmi-v7 CONTROL_CMD_RESPONSE {u8 enable; u8 now; u16; u32}."""
        enable, now, p1, p2 = V7_CMD_RESPONSE_REQ.unpack_from(msg.payload)
        if p1 or p2:
            return self._reply(msg, EINVAL)
        off = not enable
        if now == 1:
            self._replies_off = off
        self._reply(msg, 0)
        if now != 1:
            self._replies_off = off

    def _event_of(self, wire: int) -> Event | None:
        """The meaning of a wire event id (None: unknown in this dialect)."""
        return self.abi.event_meaning.get(wire)

    def _get_version(self, vcpu, p: bytes):
        return 0, self.abi.version_reply()

    def _check_command(self, vcpu, p: bytes):
        cid, p1, p2 = CHECK_REQ.unpack_from(p)
        if p1 or p2:
            return EINVAL, b""
        if cid not in self.implemented:
            return ENOENT, b""
        perm = self.abi.routes[cid].perm
        return (0 if perm is None or self._perms.command_allowed(perm) else EPERM), b""

    def _check_event(self, vcpu, p: bytes):
        wire, p1, p2 = CHECK_REQ.unpack_from(p)
        if p1 or p2:
            return EINVAL, b""
        eid = self._event_of(wire)
        if eid not in SUPPORTED_EVENTS:
            return ENOENT, b""
        return (0 if self._perms.event_allowed(eid) else EPERM), b""

    def _get_info(self, vcpu, p: bytes):
        return 0, GET_INFO_RPL.pack(self._backend.vcpu_count())

    def _get_max_gfn(self, vcpu, p: bytes):
        return 0, V7_MAX_GFN_RPL.pack(self._backend.max_gfn() & U64)

    def _control_request(self, p: bytes, supported) -> tuple[int, int, int]:
        """(error, event, enable) of a CONTROL_VM_EVENTS/CONTROL_EVENTS request: -KVM_EINVAL for
        padding, enable > 1 or an event outside `supported`; -KVM_EPERM when disallowed."""
        wire, enable, p1, p2 = CONTROL_EVENTS_REQ.unpack_from(p)
        eid = self._event_of(wire)
        if p1 or p2 or enable > 1 or eid not in supported:
            return EINVAL, wire, enable
        if not self._perms.event_allowed(eid):
            return EPERM, eid, enable
        return 0, eid, enable

    def _vm_control_events(self, vcpu, p: bytes):
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
        return size == 0 or size > PAGE_SIZE or (gpa & (PAGE_SIZE - 1)) + size > PAGE_SIZE

    def _read_physical(self, vcpu, p: bytes):
        gpa, size, ok, _ = self.abi.parse_phys(p)
        if not ok or self._bad_range(gpa, size):
            return EINVAL, b""
        data = self._backend.read_physical(gpa, size)
        if data is None:
            return ENOENT, b""
        if len(data) != size:
            raise ValueError(f"backend read {len(data)} bytes, not {size}")
        return 0, bytes(data)

    def _write_physical(self, vcpu, p: bytes):
        gpa, size, ok, start = self.abi.parse_phys(p)
        if not ok or self._bad_range(gpa, size):
            return EINVAL, b""
        data = p[start:start + size]
        if len(data) < size:
            raise ProtocolError(f"WRITE_PHYSICAL: {len(data)} bytes of data, declared {size}")
        return (0 if self._backend.write_physical(gpa, bytes(data)) else ENOENT), b""

    def _pause_vcpu(self, hdr_vcpu, p: bytes):
        vcpu, wait, ok = self.abi.parse_pause(hdr_vcpu, p)
        if not ok or wait > 1 or vcpu >= self._backend.vcpu_count():
            return EINVAL, b""
        if not self._perms.event_allowed(Event.PAUSE):
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
        nmsrs, p1, p2 = GET_REGS_REQ.unpack_from(p)
        if p1 or p2:
            return EINVAL, b""
        if nmsrs > MAX_GET_REGS_MSRS:
            return -ids.KVM_E2BIG, b""
        tail = p[GET_REGS_REQ.size:GET_REGS_REQ.size + 4 * nmsrs]
        if len(tail) < 4 * nmsrs:
            raise ProtocolError(f"GET_REGISTERS: {len(tail) // 4} of {nmsrs} MSR indexes")
        msrs = struct.unpack(f"={nmsrs}I", tail)
        mode, regs, sregs, values = self._backend.get_registers(vcpu, msrs)
        if len(values) != nmsrs:
            return EINVAL, b""
        return 0, pack_get_regs_reply(mode, regs, sregs, values)

    def _vcpu_set_registers(self, vcpu: int, p: bytes):
        regs = bytes(p[:REGS_SIZE])
        with self._lock:
            w = self._waiting.get(vcpu)
            if w is None:
                return -ids.KVM_EOPNOTSUPP, b""
            w.regs = regs   # applied on the vCPU thread once the event reply arrives
        return OK

    def _vcpu_get_cpuid(self, vcpu: int, p: bytes):
        function, index = GET_CPUID_REQ.unpack_from(p)
        regs = self._backend.get_cpuid(vcpu, function, index)
        if regs is None:
            return ENOENT, b""
        return 0, GET_CPUID_RPL.pack(*regs)

    def _vcpu_inject_exception(self, vcpu: int, p: bytes):
        nr, p1, p2, error_code, address = INJECT_REQ.unpack_from(p)
        if p1 or p2 or nr > 31:
            return EINVAL, b""
        return self._backend.inject_exception(vcpu, nr, error_code, address) or 0, b""

    def _vcpu_control_msr(self, vcpu: int, p: bytes):
        enable, p1, p2, msr = CONTROL_MSR_REQ.unpack_from(p)
        if p1 or p2 or enable > 1:
            return EINVAL, b""
        if not self._perms.event_allowed(Event.MSR):
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

    def _event_reply(self, msg: Message) -> None:
        """Hand a reply to its waiting vCPU; ProtocolError when the connection must close."""
        r = parse_event_reply(msg.payload)
        with self._lock:
            w = self._waiting.get(r.vcpu)
            if w is None:
                raise ProtocolError(f"event reply for vCPU {r.vcpu}, which waits for none")
            if msg.seq != w.seq:
                raise ProtocolError(f"event reply seq {msg.seq}, expected {w.seq}")
            wire = self.abi.event_wire(w.event)
            if r.event != wire:
                raise ProtocolError(f"reply to event {r.event}, expected {wire}")
            if r.action >= len(_ACTIONS):
                raise ProtocolError(f"unknown action {r.action}")
            if len(r.data) > w.reply_size:
                raise ProtocolError(f"event reply of {len(r.data)} bytes > {w.reply_size}")
            del self._waiting[r.vcpu]
        w.data = r.data.ljust(w.reply_size, b"\0")
        w.action = _ACTIONS[r.action]
        self._inbox.finish_waiter(w)

    def _deliver(self, vcpu: int, event: int, state: bytes, payload: bytes,
                 reply_size: int) -> EventResult:
        """Send the event (`state` block, `payload`) and read the socket (inbox.py) until the
        matching reply, a close, or the event timeout."""
        lock = self._vcpu_locks.get(vcpu)
        if lock is None:
            lock = self._vcpu_locks.setdefault(vcpu, threading.Lock())
        with lock:
            seq = next(self._seq) & 0xFFFFFFFF
            w = Waiter(seq, event, reply_size)
            data = self.abi.pack_vcpu_event(seq, event, vcpu, state, payload)
            with self._lock:
                if self._closed:
                    return RELEASED
                self._waiting[vcpu] = w
            inbox = self._inbox
            inbox.want()                      # the reader thread leaves poll(2) meanwhile
            self._send(data)
            reason = inbox.wait(w, self._event_timeout)
            if reason is not None:
                self.close(f"no reply to {ids.event_name(event)} on vCPU {vcpu} within "
                           f"{self._event_timeout}s" if reason == "timeout" else reason)
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
        return self._deliver(vcpu, event, st, payload, reply_size)

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
        old &= U64
        new &= U64
        if state.__class__ is not bytearray or len(state) != STATE_SIZE:   # else: the block
            state = state_bytes(state)          # of vcpu_state.py, packed before it changes
        res = self._deliver(vcpu, Event.MSR, state, MSR_EVENT.pack(msr, 0, old, new),
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
        return self._send(self.abi.pack_vm_event(next(self._seq) & 0xFFFFFFFF, Event.UNHOOK))

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
