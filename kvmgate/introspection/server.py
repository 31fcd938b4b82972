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
import threading
import time
from typing import Callable, NamedTuple

from ..uapi import U64
from . import ids
from .abi import V12, Dialect
from .backend import Backend
from .command_handlers import MAX_PAUSE_REQUESTS, SUPPORTED_EVENTS, CommandHandlers
from .commands import Commands
from .connection import Connection
from .ids import CONTINUE, Action, Event
from .inbox import Waiter
from .permissions import Permissions
from .protocol import (MSR_EVENT, MSR_REPLY, REPLY_SIZES, STATE_SIZE, Message, ProtocolError,
                       parse_event_reply, state_bytes)
from .tool_state import ToolState

__all__ = ["Backend", "IntrospectionServer", "EventResult", "SUPPORTED_EVENTS", "RELEASED",
           "MAX_PAUSE_REQUESTS"]

log = logging.getLogger("kvmgate.introspection")

_ACTIONS = tuple(Action)


class EventResult(NamedTuple):
    """The tool's answer to an event; `delivered` False = no answer (not sent, or released)."""
    action: Action
    data: bytes
    delivered: bool


RELEASED = EventResult(CONTINUE, b"", False)


def _msr_answer(res: EventResult, old: int, new: int) -> tuple[Action, int]:
    """(action, value to write) of an MSR event's result (see msr_event)."""
    if not res.delivered:
        return CONTINUE, new
    if res.action == CONTINUE:
        return CONTINUE, MSR_REPLY.unpack(res.data)[0]
    return res.action, old


class IntrospectionServer(ToolState):
    """KVMI on a connected stream socket that this object owns (and closes), in one dialect:
    the connection (connection.py), the commands (commands.py, command_handlers.py), the state
    the tool set up (tool_state.py) and, here, the events and closing."""

    def __init__(self, sock: socket.socket, backend: Backend, permissions: Permissions, *,
                 on_close: Callable[[str], None] | None = None,
                 event_timeout: float | None = None, name: str = "kvmi", abi: Dialect = V12):
        super().__init__(permissions)
        self._backend = backend
        self._on_close = on_close
        self._event_timeout = event_timeout
        self.abi = abi
        # The C MSR event path of the backend, if it has one (Backend.event_port): it shares
        # the reader token (inbox.py) and the event seq, and reads what publish() tells it.
        self._port = backend.event_port(sock, abi, event_timeout)
        if self._port is not None:
            self._next_seq = self._port.next_seq
        else:
            counter = itertools.count(1)
            self._next_seq = lambda: next(counter) & 0xFFFFFFFF
        self._vcpu_locks: dict[int, threading.Lock] = {}
        self.close_reason: str | None = None
        self.messages = 0
        self._conn = Connection(sock, self.process, self.close, name, port=self._port)
        self._inbox = self._conn.inbox
        self._send = self._conn.send
        self.internal_errors = self._conn.internal_errors
        self._handlers = CommandHandlers(
            abi, backend, permissions, lock=self._lock, vm_events=self._vm_events,
            vcpu_events=self._vcpu_events, msrs=self._msrs, pauses=self._pauses,
            waiting=self._waiting, is_closed=lambda: self._closed, take_pause=self._take_pause)
        commands = Commands(abi, permissions, self._handlers.table, backend.vcpu_count,
                            self._send)
        self._command = commands.command
        self.handler_errors = commands.handler_errors
        self.implemented = self._handlers.implemented

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> "IntrospectionServer":
        self._conn.start()
        return self

    @property
    def port(self):
        """The session's C MSR event path (Backend.event_port), or None."""
        return self._port

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, reason: str = "closed") -> bool:
        """Shut the socket both ways, undo interceptions, release waiting vCPUs.  Idempotent."""
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
        self.publish()
        self._conn.shutdown()
        # Undo the interceptions before the waiting vCPUs go on (they count as parked while
        # they wait): a released vCPU's next write must not exit to a tool that is gone.
        for vcpu, msr in controlled:
            self._handlers.undo_msr(vcpu, msr)
        for w in waiters:
            self._inbox.finish_waiter(w)
        log.info("introspection connection closed: %s", reason)
        if self._on_close is not None:
            try:
                self._on_close(reason)
            except Exception:
                log.exception("on_close callback failed")
        return True

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the reader thread (not from the reader thread itself); True if it ended."""
        return self._conn.join(timeout)

    def on_reader_thread(self) -> bool:
        return self._conn.on_reader_thread()

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until the tool closes its end (or the connection is closed otherwise)."""
        if self._conn.on_reader_thread():
            return self._closed
        return self._conn.join(timeout)

    def process(self, msg: Message) -> None:
        """Handle one decoded message as the token holder does: answer a command, or hand an
        event reply to its vCPU.  ProtocolError when the connection must close."""
        self.messages += 1
        if msg.id == self.abi.reply_id:
            self._event_reply(msg)
        else:
            self._command(msg)
            if self._port is not None:
                self.publish()          # before the token goes back: C sees the new state

    def publish(self) -> None:
        """Tell the C MSR event path, per vCPU, which MSR writes are events now (msr_wanted's
        rule: controlled, MSR event enabled and allowed, connection open).  After every command
        and permission change, and on close."""
        port = self._port
        if port is not None:
            wanted = self.wanted_msr_events()
            for v in range(self._backend.vcpu_count()):
                port.set_wanted(v, wanted.get(v, ()))

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
        with self._vcpu_lock(vcpu):
            seq = self._next_seq()
            w = Waiter(seq, event, reply_size)
            data = self.abi.pack_vcpu_event(seq, event, vcpu, state, payload)
            with self._lock:
                if self._closed:
                    return RELEASED
                self._waiting[vcpu] = w
            inbox = self._inbox
            inbox.want()                      # the reader thread leaves poll(2) meanwhile
            self._send(data)
            return self._delivered(vcpu, w, inbox.wait(w, self._event_timeout))

    def _vcpu_lock(self, vcpu: int) -> threading.Lock:
        """One event at a time per vCPU."""
        return self._vcpu_locks.get(vcpu) or self._vcpu_locks.setdefault(vcpu, threading.Lock())

    def _delivered(self, vcpu: int, w: Waiter, reason: str | None) -> EventResult:
        """The end of an event's wait: close when `reason` says so; the tool's answer."""
        if reason is not None:
            self.close(f"no reply to {ids.event_name(w.event)} on vCPU {vcpu} within "
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
        if not ids.msr_write_is_event(old, new) or self._closed:
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
        return _msr_answer(res, old, new)

    def adopt_msr_event(self, vcpu: int, seq: int, old: int, new: int, data: bytes,
                        elapsed: float) -> tuple[Action, int]:
        """The MSR event `seq` that the C event path sent on `vcpu`'s thread and left to
        Python (csrc/kvmi_event.h, KG_EV_HANDOFF), with the `data` it read so far, `elapsed`
        seconds ago: wait for its reply as msr_event does (the token is C's, now ours)."""
        w = Waiter(seq, Event.MSR, MSR_REPLY.size)
        with self._lock:
            if not self._closed:
                self._waiting[vcpu] = w
        timeout = self._event_timeout
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout - elapsed)
        with self._vcpu_lock(vcpu):
            reason = self._inbox.adopt(w, data, deadline)
            with self._lock:
                if self._waiting.get(vcpu) is w:      # not answered: nobody else will
                    del self._waiting[vcpu]
            return _msr_answer(self._delivered(vcpu, w, reason), old, new)

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
        return self._send(self.abi.pack_vm_event(self._next_seq(), Event.UNHOOK))
