"""The tool's side of KVMI (docs/introspection.md, v12): commands, and an event loop that answers events.

One thread per `Client`.  Events that arrive while a command waits for its reply are queued
and returned by `events()` later, so an event callback may itself send commands.
"""
from __future__ import annotations

import itertools
import socket
from collections import deque
from typing import Callable, Iterator, NamedTuple, Sequence

from . import ids
from .ids import CONTINUE, CRASH, Action
from .protocol import (CHECK_REQ, CONTROL_EVENTS_REQ, CONTROL_MSR_REQ, ERR, GET_INFO_RPL,
                       MSR_REPLY, PAUSE_REQ, READ_PHYS_REQ, REGS_SIZE, VCPU_HDR, VCPU_INFO_RPL,
                       VERSION_RPL, WRITE_PHYS_REQ, Message, ProtocolError, Reader, Registers,
                       Regs, Sregs, VcpuState, fixed, pack_event_reply, pack_get_regs_request,
                       pack_message, parse_event, parse_get_regs_reply, parse_msr_event)

__all__ = ["Client", "Event", "IntrospectionError", "Crash", "Version", "CONTINUE", "RETRY",
           "CRASH", "ProtocolError"]
RETRY = ids.RETRY


class IntrospectionError(Exception):
    """The server answered a command with an error: `.code` is negative (-1 = -KVM_EPERM)."""

    def __init__(self, code: int, command: int | None = None):
        self.code = code
        self.name = ids.error_name(code)
        self.command = command
        where = f"{ids.command_name(command)}: " if command is not None else ""
        super().__init__(f"{where}{self.name} ({code})")


class Crash(Exception):
    """Raise from an event callback to answer CRASH."""


class Version(NamedTuple):
    version: int
    max_msg_size: int
    features: bytes


class Event:
    """An event from the owner.  VM events (UNHOOK) have `vcpu` None and no state."""

    __slots__ = ("client", "seq", "event", "vcpu", "state", "payload", "msr", "old", "new",
                 "replied")

    def __init__(self, client: "Client", seq: int, event: int, vcpu: int | None,
                 state: VcpuState | None, payload: bytes):
        self.client, self.seq, self.event, self.vcpu = client, seq, event, vcpu
        self.state, self.payload = state, payload
        self.msr = self.old = self.new = None
        if vcpu is not None and event == ids.VCPU_EVENT_MSR:
            self.msr, self.old, self.new = parse_msr_event(payload)
        self.replied = vcpu is None      # VM events take no reply

    @property
    def name(self) -> str:
        return ids.event_name(self.event)

    @property
    def regs(self) -> Regs | None:
        return None if self.state is None else Regs.unpack(self.state.regs)

    @property
    def sregs(self) -> Sregs | None:
        return None if self.state is None else Sregs.unpack(self.state.sregs)

    def reply(self, action: int = CONTINUE, data: bytes = b"") -> None:
        self.client.reply_event(self, action, data)

    def reply_msr(self, value: int | None = None, action: int = CONTINUE) -> None:
        """MSR event reply: write `value` (default: the guest's new value)."""
        self.reply(action, MSR_REPLY.pack(self.new if value is None else value))

    def __repr__(self) -> str:
        extra = "" if self.msr is None else \
            f" msr={self.msr:#x} old={self.old:#x} new={self.new:#x}"
        return f"<Event {self.name} vcpu={self.vcpu} seq={self.seq}{extra}>"


class Client:
    """An introspection tool's connection."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._reader = Reader(sock)
        self._seq = itertools.count(1)
        self._pending: deque[Event] = deque()

    @classmethod
    def connect(cls, path: str, timeout: float | None = None) -> "Client":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(path)
        except BaseException:
            s.close()
            raise
        return cls(s)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- commands -------------------------------------------------------------------------

    def request(self, mid: int, payload: bytes = b"") -> bytes:
        """Send a command and return its reply data; raise IntrospectionError on err != 0."""
        seq = next(self._seq) & 0xFFFFFFFF
        self.sock.sendall(pack_message(mid, seq, payload))
        while True:
            msg = self._reader.read()
            if msg is None:
                raise ConnectionError("introspection connection closed")
            if msg.id in (ids.MSG_VM_EVENT, ids.MSG_VCPU_EVENT):
                self._pending.append(self._event(msg))
                continue
            if msg.id != mid or msg.seq != seq:
                raise ProtocolError(f"reply {ids.message_name(msg.id)} seq {msg.seq}, "
                                    f"expected {ids.command_name(mid)} seq {seq}")
            err, _ = fixed(ERR, msg.payload)
            if err:
                raise IntrospectionError(err, mid)
            return msg.payload[ERR.size:]

    def vcpu_request(self, mid: int, vcpu: int, payload: bytes = b"") -> bytes:
        return self.request(mid, VCPU_HDR.pack(vcpu, 0, 0) + payload)

    def get_version(self) -> Version:
        v, size, features = fixed(VERSION_RPL, self.request(ids.GET_VERSION))
        return Version(v, size, features)

    def _check(self, mid: int, what: int) -> bool:
        try:
            self.request(mid, CHECK_REQ.pack(what, 0, 0))
        except IntrospectionError as exc:
            if exc.code == -ids.KVM_EPERM:
                return False
            raise
        return True

    def check_command(self, cid: int) -> bool:
        """True if allowed, False if disallowed; IntrospectionError(-KVM_ENOENT) if unknown."""
        return self._check(ids.VM_CHECK_COMMAND, cid)

    def check_event(self, eid: int) -> bool:
        """True if allowed, False if disallowed; IntrospectionError(-KVM_ENOENT) if unknown."""
        return self._check(ids.VM_CHECK_EVENT, eid)

    def get_info(self) -> int:
        """The VM's vCPU count."""
        return fixed(GET_INFO_RPL, self.request(ids.VM_GET_INFO))[0]

    def control_events(self, event: int = ids.VM_EVENT_UNHOOK, enable: bool = True) -> None:
        """VM_CONTROL_EVENTS (only the UNHOOK event)."""
        self.request(ids.VM_CONTROL_EVENTS, CONTROL_EVENTS_REQ.pack(event, int(enable), 0, 0))

    def read_physical(self, gpa: int, size: int) -> bytes:
        return self.request(ids.VM_READ_PHYSICAL, READ_PHYS_REQ.pack(gpa, size, 0, 0))

    def write_physical(self, gpa: int, data: bytes) -> None:
        self.request(ids.VM_WRITE_PHYSICAL, WRITE_PHYS_REQ.pack(gpa, len(data), 0, 0) + bytes(data))

    def pause_vcpu(self, vcpu: int, wait: bool = False) -> None:
        """VM_PAUSE_VCPU: a PAUSE event follows."""
        self.request(ids.VM_PAUSE_VCPU, PAUSE_REQ.pack(vcpu, int(wait), 0, 0))

    def vcpu_get_info(self, vcpu: int) -> int:
        """TSC speed in Hz (0 if unknown)."""
        return fixed(VCPU_INFO_RPL, self.vcpu_request(ids.VCPU_GET_INFO, vcpu))[0]

    def vcpu_control_events(self, vcpu: int, event: int, enable: bool = True) -> None:
        self.vcpu_request(ids.VCPU_CONTROL_EVENTS, vcpu,
                          CONTROL_EVENTS_REQ.pack(event, int(enable), 0, 0))

    def get_registers(self, vcpu: int, msrs: Sequence[int] = ()) -> Registers:
        data = self.vcpu_request(ids.VCPU_GET_REGISTERS, vcpu, pack_get_regs_request(msrs))
        return parse_get_regs_reply(data)

    def set_registers(self, vcpu: int, regs) -> None:
        """Only while `vcpu` waits for this tool's event reply; applied when the reply is sent."""
        raw = regs.pack() if isinstance(regs, Regs) else bytes(regs)
        if len(raw) != REGS_SIZE:
            raise ValueError(f"kvm_regs is {REGS_SIZE} bytes, not {len(raw)}")
        self.vcpu_request(ids.VCPU_SET_REGISTERS, vcpu, raw)

    def control_msr(self, vcpu: int, msr: int, enable: bool = True) -> None:
        """VCPU_CONTROL_MSR: MSR events for guest writes to `msr` (enable the MSR event too)."""
        self.vcpu_request(ids.VCPU_CONTROL_MSR, vcpu, CONTROL_MSR_REQ.pack(int(enable), 0, 0, msr))

    # --- events ---------------------------------------------------------------------------

    def _event(self, msg: Message) -> Event:
        p = parse_event(msg)
        return Event(self, p.seq, p.event, p.vcpu, p.state, p.payload)

    def next_event(self) -> Event | None:
        """The next event, or None when the owner closed the connection."""
        if self._pending:
            return self._pending.popleft()
        msg = self._reader.read()
        if msg is None:
            return None
        if msg.id not in (ids.MSG_VM_EVENT, ids.MSG_VCPU_EVENT):
            raise ProtocolError(f"unexpected {ids.message_name(msg.id)} seq {msg.seq}")
        return self._event(msg)

    def events(self) -> Iterator[Event]:
        while (ev := self.next_event()) is not None:
            yield ev

    def reply_event(self, ev: Event, action: int = CONTINUE, data: bytes = b"") -> None:
        if ev.replied:
            raise ValueError(f"{ev!r} was already answered (or takes no reply)")
        ev.replied = True
        self.sock.sendall(pack_event_reply(ev.seq, ev.vcpu, int(action), ev.event, data))

    def serve(self, on_msr: Callable[[Event], object] | None = None,
              on_pause: Callable[[Event], object] | None = None,
              on_unhook: Callable[[Event], object] | None = None,
              on_event: Callable[[Event], object] | None = None) -> str:
        """Answer events until UNHOOK ("unhook") or EOF ("eof").

        on_msr(ev) returns the value to write (None: the guest's), or an Action (RETRY, CRASH);
        raising answers CRASH (a `Crash` is swallowed, anything else re-raised afterwards).
        on_pause/on_event return None (CONTINUE) or an Action.  A callback may reply itself.
        """
        for ev in self.events():
            if ev.vcpu is None:
                if ev.event == ids.VM_EVENT_UNHOOK:
                    if on_unhook is not None:
                        on_unhook(ev)
                    return "unhook"
                continue
            cb = on_msr if ev.event == ids.VCPU_EVENT_MSR else \
                on_pause if ev.event == ids.VCPU_EVENT_PAUSE else on_event
            try:
                ret = cb(ev) if cb is not None else None
            except Crash:
                ret = CRASH
            except BaseException:
                if not ev.replied:
                    self._answer(ev, CRASH)
                raise
            if not ev.replied:
                self._answer(ev, ret)
        return "eof"

    def _answer(self, ev: Event, ret: object) -> None:
        msr = ev.event == ids.VCPU_EVENT_MSR
        if ret is None or (isinstance(ret, Action) and ret == CONTINUE):
            action, value = CONTINUE, ev.new
        elif isinstance(ret, Action):
            action, value = ret, ev.old
        else:
            action, value = CONTINUE, int(ret)
        if msr:
            self.reply_event(ev, action, MSR_REPLY.pack(value & ((1 << 64) - 1)))
        else:
            self.reply_event(ev, action)

