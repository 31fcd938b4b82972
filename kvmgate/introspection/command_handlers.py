"""What each KVMI command does (docs/introspection.md §2, and §3 for the event controls): one
handler per `abi.Op`, on the thread answering the command.

A handler gets (vcpu or None, the request after the vCPU header) and returns (error, reply
data); a positive error is negated by the caller (commands.py).  The state the tool controls
(enabled events, controlled MSRs, pending pauses, waiting vCPUs) is the server's (tool_state.py),
shared with its event side under the server's lock; `CommandHandlers` gets those containers
and callables at construction.
"""
from __future__ import annotations

import logging
import struct
import threading
from typing import Callable

from ..uapi import U64
from . import ids
from .abi import V7_MAX_GFN_RPL, Dialect, Op
from .backend import Backend
from .ids import Event
from .inbox import Waiter
from .permissions import Permissions
from .protocol import (CHECK_REQ, CONTROL_EVENTS_REQ, CONTROL_MSR_REQ, GET_CPUID_REQ,
                       GET_CPUID_RPL, GET_INFO_RPL, GET_REGS_REQ, INJECT_REQ, MAX_GET_REGS_MSRS,
                       PAGE_SIZE, REGS_SIZE, VCPU_INFO_RPL, ProtocolError, msr_valid,
                       pack_get_regs_reply)

__all__ = ["CommandHandlers", "SUPPORTED_EVENTS", "MAX_PAUSE_REQUESTS"]

log = logging.getLogger("kvmgate.introspection")

MAX_PAUSE_REQUESTS = 1000   # pending PAUSE events per vCPU before PAUSE_VCPU gets -KVM_EBUSY
SUPPORTED_VM_EVENTS = frozenset({Event.UNHOOK})
SUPPORTED_VCPU_EVENTS = frozenset({Event.PAUSE, Event.MSR})
SUPPORTED_EVENTS = SUPPORTED_VM_EVENTS | SUPPORTED_VCPU_EVENTS

EINVAL, EPERM, ENOENT = -ids.KVM_EINVAL, -ids.KVM_EPERM, -ids.KVM_ENOENT
OK = (0, b"")

Handler = Callable[[int | None, bytes], tuple[int, bytes]]


class CommandHandlers:
    """The command table of one server: `table[op](vcpu, request) -> (error, reply data)`."""

    def __init__(self, abi: Dialect, backend: Backend, permissions: Permissions, *,
                 lock: threading.Lock, vm_events: set[int], vcpu_events: dict[int, set[int]],
                 msrs: dict[int, set[int]], pauses: dict[int, int], waiting: dict[int, Waiter],
                 is_closed: Callable[[], bool], take_pause: Callable[[int], bool]):
        self.abi = abi
        self._backend = backend
        self._perms = permissions
        self._lock = lock
        self._vm_events = vm_events
        self._vcpu_events = vcpu_events
        self._msrs = msrs
        self._pauses = pauses
        self._waiting = waiting
        self._is_closed = is_closed
        self._take_pause = take_pause
        # One handler per operation; (vcpu or None, request after the vCPU header).
        self.table: dict[Op, Handler] = {
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

    def undo_msr(self, vcpu: int, msr: int) -> None:
        try:
            self._backend.control_msr(vcpu, msr, False)
        except Exception:
            log.exception("undoing MSR %#x interception on vCPU %d failed", msr, vcpu)


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
            if self._is_closed():
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
            closed = self._is_closed()
            late = closed and enable
            if not closed:
                msrs = self._msrs.setdefault(vcpu, set())
                if enable:
                    msrs.add(msr)
                else:
                    msrs.discard(msr)
        if late:   # closed while we enabled it: close() could not see it, undo it here
            self.undo_msr(vcpu, msr)
        return OK
