"""The two KVMI wire dialects kvmgate serves, chosen per session (docs/introspection.md):

* ``V12``: the upstream patch series v10-v12 (2020-2021): VM messages even, vCPU messages odd,
  vCPU events with an 8-byte event header then `{u16 size; u16 vcpu; u32}`, event replies as
  message 1.
* ``V7``: the KVM-VMI ``kvmi-v7`` kernel branch that Bitdefender's libkvmi speaks (LibVMI's
  KVM driver, HVMI): flat command ids, vCPU events as message 1 holding `struct kvmi_event`
  `{u16 size; u16 vcpu; u8 event; u8 pad[3]; arch}` with no separate event header, event
  replies as message 0, PAUSE_VCPU and READ/WRITE_PHYSICAL with other layouts, and
  CONTROL_CMD_RESPONSE framing libkvmi's batches.

Both report KVMI_VERSION 1: equal version numbers do NOT mean compatible.  A `Dialect` maps each
wire id onto a `Route`: the operation (its meaning), the v12 command whose permission governs
it, whether the payload starts with the vCPU header, and the fixed request size (a shorter
request closes the connection).  Event ids map onto `ids.Event` the same way.
"""
from __future__ import annotations

import enum
from struct import Struct
from typing import NamedTuple

from . import ids
from .ids import Command, Event
from .protocol import (CHECK_REQ, CONTROL_EVENTS_REQ, CONTROL_MSR_REQ, GET_CPUID_REQ,
                       GET_REGS_REQ, HEADER, INJECT_REQ, MAX_MSG_SIZE, MSR_EVENT, REGS_SIZE,
                       STATE_SIZE, ProtocolError, VERSION, VERSION_RPL, pack_message, pack_vcpu_event,
                       pack_vm_event)
from .protocol import PAUSE_REQ as V12_PAUSE_REQ
from .protocol import READ_PHYS_REQ as V12_PHYS_REQ


class Op(enum.Enum):
    """What a command does, whatever its wire id (the server has one handler per Op)."""
    GET_VERSION = "GET_VERSION"
    CHECK_COMMAND = "CHECK_COMMAND"
    CHECK_EVENT = "CHECK_EVENT"
    GET_INFO = "GET_INFO"
    CONTROL_VM_EVENTS = "CONTROL_VM_EVENTS"
    READ_PHYSICAL = "READ_PHYSICAL"
    WRITE_PHYSICAL = "WRITE_PHYSICAL"
    PAUSE_VCPU = "PAUSE_VCPU"
    GET_VCPU_INFO = "GET_VCPU_INFO"
    CONTROL_EVENTS = "CONTROL_EVENTS"
    GET_REGISTERS = "GET_REGISTERS"
    SET_REGISTERS = "SET_REGISTERS"
    GET_CPUID = "GET_CPUID"
    INJECT_EXCEPTION = "INJECT_EXCEPTION"
    CONTROL_MSR = "CONTROL_MSR"
    GET_MAX_GFN = "GET_MAX_GFN"
    CONTROL_CMD_RESPONSE = "CONTROL_CMD_RESPONSE"
    UNSERVED = "UNSERVED"        # a known command kvmgate cannot serve: an error reply


class Route(NamedTuple):
    op: Op
    perm: int | None     # the v12 command whose permission applies; None = always allowed
    vcpu: bool           # payload starts with {u16 vcpu; u16; u32}
    size: int            # request bytes after the vCPU header; fewer close the connection
    name: str            # the dialect's own name for the command


# kvmi-v7-only layouts.
V7_PAUSE_REQ = Struct("=BBHI")        # after the vCPU header: {u8 wait; u8; u16; u32}
V7_PHYS_REQ = Struct("=QQ")           # {u64 gpa; u64 size} (+ data for writes)
V7_CMD_RESPONSE_REQ = Struct("=BBHI")  # {u8 enable; u8 now; u16; u32}
V7_VERSION_RPL = Struct("=II8s")      # {u32 version; u32 padding; struct kvmi_features}
V7_MAX_GFN_RPL = Struct("=Q")         # {u64 gfn}
V7_EVENT = Struct("=HHB3x")           # struct kvmi_event up to arch: {u16 size; u16 vcpu; u8 event}
V7_EVENT_SIZE = V7_EVENT.size + STATE_SIZE   # 544: `size` covers the common part and arch
_V7_EVENT_PREFIX = Struct("=HHI" "HHB3x")   # HEADER then V7_EVENT
V7_MSR_EVENT_MSG_SIZE = HEADER.size + V7_EVENT_SIZE + MSR_EVENT.size   # 576


class Dialect:
    """One wire ABI: routes for incoming ids, event ids both ways, and the layouts that differ."""

    name: str
    routes: dict[int, Route]
    event_ids: dict[Event, int]           # meaning -> wire id
    reply_id: int                         # message id of event replies
    unserved_error: int                   # reply to a known command kvmgate cannot serve
    batches: bool                         # CONTROL_CMD_RESPONSE exists

    def __init__(self):
        self.event_meaning = {w: e for e, w in self.event_ids.items()}
        self.command_names = {mid: r.name for mid, r in self.routes.items()}

    def __repr__(self) -> str:
        return f"<KVMI ABI {self.name}>"

    def route(self, mid: int) -> Route | None:
        return self.routes.get(mid)

    def event_wire(self, event: Event) -> int:
        return self.event_ids[event]

    def command_name(self, mid: int) -> str:
        return self.command_names.get(mid, f"command({mid})")

    # Layouts that differ between the dialects (overridden below).
    def version_reply(self) -> bytes:
        raise NotImplementedError

    def parse_pause(self, vcpu: int | None, body: bytes) -> tuple[int, int, bool]:
        """(vcpu, wait, padding ok) of a PAUSE_VCPU request; `vcpu` from the vCPU header
        (kvmi-v7) or None (v12: the index is in the request)."""
        raise NotImplementedError

    def parse_phys(self, payload: bytes) -> tuple[int, int, bool, int]:
        """(gpa, size, padding ok, offset of write data) of READ/WRITE_PHYSICAL."""
        raise NotImplementedError

    def pack_vcpu_event(self, seq: int, event: Event, vcpu: int, state: bytes,
                        payload: bytes = b"") -> bytes:
        raise NotImplementedError

    def pack_vm_event(self, seq: int, event: Event) -> bytes:
        raise NotImplementedError


def _routes(table) -> dict[int, Route]:
    return {mid: Route(op, perm, vcpu, size, name) for mid, name, op, perm, vcpu, size in table}


class _V12(Dialect):
    name = "v12"
    reply_id = ids.MSG_VCPU_EVENT
    unserved_error = -ids.KVM_ENOSYS
    batches = False
    event_ids = {e: int(e) for e in Event}
    _served = {
        Command.GET_VERSION: (Op.GET_VERSION, 0),
        Command.VM_CHECK_COMMAND: (Op.CHECK_COMMAND, CHECK_REQ.size),
        Command.VM_CHECK_EVENT: (Op.CHECK_EVENT, CHECK_REQ.size),
        Command.VM_GET_INFO: (Op.GET_INFO, 0),
        Command.VM_CONTROL_EVENTS: (Op.CONTROL_VM_EVENTS, CONTROL_EVENTS_REQ.size),
        Command.VM_READ_PHYSICAL: (Op.READ_PHYSICAL, V12_PHYS_REQ.size),
        Command.VM_WRITE_PHYSICAL: (Op.WRITE_PHYSICAL, V12_PHYS_REQ.size),
        Command.VM_PAUSE_VCPU: (Op.PAUSE_VCPU, V12_PAUSE_REQ.size),
        Command.VCPU_GET_INFO: (Op.GET_VCPU_INFO, 0),
        Command.VCPU_CONTROL_EVENTS: (Op.CONTROL_EVENTS, CONTROL_EVENTS_REQ.size),
        Command.VCPU_GET_REGISTERS: (Op.GET_REGISTERS, GET_REGS_REQ.size),
        Command.VCPU_SET_REGISTERS: (Op.SET_REGISTERS, REGS_SIZE),
        Command.VCPU_GET_CPUID: (Op.GET_CPUID, GET_CPUID_REQ.size),
        Command.VCPU_INJECT_EXCEPTION: (Op.INJECT_EXCEPTION, INJECT_REQ.size),
        Command.VCPU_CONTROL_MSR: (Op.CONTROL_MSR, CONTROL_MSR_REQ.size),
    }

    def __init__(self):
        table = []
        for c in Command:
            op, size = self._served.get(c, (Op.UNSERVED, 0))
            table.append((int(c), c.name, op, int(c), bool(c & 1), size))
        self.routes = _routes(table)
        super().__init__()

    def version_reply(self) -> bytes:
        return VERSION_RPL.pack(VERSION, MAX_MSG_SIZE, bytes(8))

    def parse_pause(self, vcpu, body):
        vcpu, wait, p1, p2 = V12_PAUSE_REQ.unpack_from(body)
        return vcpu, wait, not (p1 or p2)

    def parse_phys(self, payload):
        gpa, size, p1, p2 = V12_PHYS_REQ.unpack_from(payload)
        return gpa, size, not (p1 or p2), V12_PHYS_REQ.size

    def pack_vcpu_event(self, seq, event, vcpu, state, payload=b""):
        return pack_vcpu_event(seq, event, vcpu, state, payload)

    def pack_vm_event(self, seq, event):
        return pack_vm_event(seq, event)


class V7Command(enum.IntEnum):
    """kvmi-v7 message ids (libkvmi's include/linux/kvmi.h)."""
    EVENT_REPLY = 0
    EVENT = 1
    GET_VERSION = 2
    CHECK_COMMAND = 3
    CHECK_EVENT = 4
    GET_GUEST_INFO = 5
    GET_VCPU_INFO = 6
    PAUSE_VCPU = 7
    CONTROL_VM_EVENTS = 8
    CONTROL_EVENTS = 9
    CONTROL_CR = 10
    CONTROL_MSR = 11
    CONTROL_VE = 12
    GET_REGISTERS = 13
    SET_REGISTERS = 14
    GET_CPUID = 15
    GET_XSAVE = 16
    READ_PHYSICAL = 17
    WRITE_PHYSICAL = 18
    INJECT_EXCEPTION = 19
    GET_PAGE_ACCESS = 20
    SET_PAGE_ACCESS = 21
    GET_MAP_TOKEN = 22
    GET_MTRR_TYPE = 23
    CONTROL_SPP = 24
    GET_PAGE_WRITE_BITMAP = 25
    SET_PAGE_WRITE_BITMAP = 26
    CONTROL_CMD_RESPONSE = 27
    SET_VE_INFO_PAGE = 28
    GET_MAX_GFN = 29
    GET_NEXT_AVAILABLE_GFN = 31
    SWITCH_EPT_VIEW = 32
    DISABLE_VE = 33
    GET_EPT_VIEW = 34
    VCPU_TRANSLATE_GVA = 35
    CONTROL_EPT_VIEW = 36
    VCPU_GET_XCR = 37
    VCPU_SET_XSAVE = 38
    QUERY_PHYSICAL = 39
    VCPU_ALLOC_GFN = 41
    VCPU_FREE_GFN = 42
    CREATE_EPT_VIEW = 43
    DESTROY_EPT_VIEW = 44
    VCPU_CHANGE_GFN = 60
    VCPU_CONTROL_SINGLESTEP = 63


class V7Event(enum.IntEnum):
    """kvmi-v7 event ids."""
    UNHOOK = 0
    CR = 1
    MSR = 2
    XSETBV = 3
    BREAKPOINT = 4
    HYPERCALL = 5
    PF = 6
    TRAP = 7
    DESCRIPTOR = 8
    CREATE_VCPU = 9
    PAUSE_VCPU = 10
    SINGLESTEP = 11
    CPUID = 13


C7 = V7Command
# kvmi-v7 commands that take the vCPU header (the kernel runs them on the vCPU's thread).
_V7_VCPU = frozenset({C7.GET_VCPU_INFO, C7.PAUSE_VCPU, C7.CONTROL_EVENTS, C7.CONTROL_CR,
                      C7.CONTROL_MSR, C7.CONTROL_VE, C7.GET_REGISTERS, C7.SET_REGISTERS,
                      C7.GET_CPUID, C7.GET_XSAVE, C7.INJECT_EXCEPTION, C7.GET_MTRR_TYPE,
                      C7.SET_VE_INFO_PAGE, C7.SWITCH_EPT_VIEW, C7.DISABLE_VE, C7.GET_EPT_VIEW,
                      C7.VCPU_TRANSLATE_GVA, C7.CONTROL_EPT_VIEW, C7.VCPU_GET_XCR,
                      C7.VCPU_SET_XSAVE, C7.VCPU_CHANGE_GFN, C7.VCPU_CONTROL_SINGLESTEP})


class _V7(Dialect):
    name = "v7"
    reply_id = C7.EVENT_REPLY
    unserved_error = -ids.KVM_EOPNOTSUPP      # the kvmi-v7 kernel's answer to "unsupported"
    batches = True
    event_ids = {Event.UNHOOK: V7Event.UNHOOK, Event.CR: V7Event.CR, Event.MSR: V7Event.MSR,
                 Event.XSETBV: V7Event.XSETBV, Event.BREAKPOINT: V7Event.BREAKPOINT,
                 Event.HYPERCALL: V7Event.HYPERCALL, Event.PF: V7Event.PF,
                 Event.TRAP: V7Event.TRAP, Event.DESCRIPTOR: V7Event.DESCRIPTOR,
                 Event.PAUSE: V7Event.PAUSE_VCPU, Event.SINGLESTEP: V7Event.SINGLESTEP}
    # wire id -> (op, the v12 command whose permission applies, request size after vcpu hdr)
    _served = {
        C7.GET_VERSION: (Op.GET_VERSION, Command.GET_VERSION, 0),
        C7.CHECK_COMMAND: (Op.CHECK_COMMAND, Command.VM_CHECK_COMMAND, CHECK_REQ.size),
        C7.CHECK_EVENT: (Op.CHECK_EVENT, Command.VM_CHECK_EVENT, CHECK_REQ.size),
        C7.GET_GUEST_INFO: (Op.GET_INFO, Command.VM_GET_INFO, 0),
        C7.GET_VCPU_INFO: (Op.GET_VCPU_INFO, Command.VCPU_GET_INFO, 0),
        C7.PAUSE_VCPU: (Op.PAUSE_VCPU, Command.VM_PAUSE_VCPU, V7_PAUSE_REQ.size),
        C7.CONTROL_VM_EVENTS: (Op.CONTROL_VM_EVENTS, Command.VM_CONTROL_EVENTS,
                               CONTROL_EVENTS_REQ.size),
        C7.CONTROL_EVENTS: (Op.CONTROL_EVENTS, Command.VCPU_CONTROL_EVENTS,
                            CONTROL_EVENTS_REQ.size),
        C7.CONTROL_MSR: (Op.CONTROL_MSR, Command.VCPU_CONTROL_MSR, CONTROL_MSR_REQ.size),
        C7.GET_REGISTERS: (Op.GET_REGISTERS, Command.VCPU_GET_REGISTERS, GET_REGS_REQ.size),
        C7.SET_REGISTERS: (Op.SET_REGISTERS, Command.VCPU_SET_REGISTERS, REGS_SIZE),
        C7.GET_CPUID: (Op.GET_CPUID, Command.VCPU_GET_CPUID, GET_CPUID_REQ.size),
        C7.READ_PHYSICAL: (Op.READ_PHYSICAL, Command.VM_READ_PHYSICAL, V7_PHYS_REQ.size),
        C7.WRITE_PHYSICAL: (Op.WRITE_PHYSICAL, Command.VM_WRITE_PHYSICAL, V7_PHYS_REQ.size),
        C7.INJECT_EXCEPTION: (Op.INJECT_EXCEPTION, Command.VCPU_INJECT_EXCEPTION,
                              INJECT_REQ.size),
        # No v12 counterpart: framing only (always allowed), and the VM's size, which
        # VM_GET_INFO's permission governs.
        C7.CONTROL_CMD_RESPONSE: (Op.CONTROL_CMD_RESPONSE, None, V7_CMD_RESPONSE_REQ.size),
        C7.GET_MAX_GFN: (Op.GET_MAX_GFN, Command.VM_GET_INFO, 0),
    }
    # Known kvmi-v7 commands kvmgate cannot serve, with the v12 command whose permission
    # applies where there is one.
    _unserved_perm = {
        C7.CONTROL_CR: Command.VCPU_CONTROL_CR,
        C7.GET_XSAVE: Command.VCPU_GET_XSAVE,
        C7.SET_PAGE_ACCESS: Command.VM_SET_PAGE_ACCESS,
        C7.GET_MTRR_TYPE: Command.VCPU_GET_MTRR_TYPE,
        C7.VCPU_TRANSLATE_GVA: Command.VCPU_TRANSLATE_GVA,
        C7.VCPU_GET_XCR: Command.VCPU_GET_XCR,
        C7.VCPU_SET_XSAVE: Command.VCPU_SET_XSAVE,
        C7.VCPU_CONTROL_SINGLESTEP: Command.VCPU_CONTROL_SINGLESTEP,
    }

    def __init__(self):
        table = []
        for c in C7:
            if c in (C7.EVENT_REPLY, C7.EVENT):
                continue
            if c in self._served:
                op, perm, size = self._served[c]
            else:
                op, perm, size = Op.UNSERVED, self._unserved_perm.get(c), 0
            table.append((int(c), c.name, op, perm, c in _V7_VCPU, size))
        self.routes = _routes(table)
        super().__init__()

    def version_reply(self) -> bytes:
        return V7_VERSION_RPL.pack(VERSION, 0, bytes(8))     # no SPP/VMFUNC/EPTP/#VE

    def parse_pause(self, vcpu, body):
        wait, p1, p2, p3 = V7_PAUSE_REQ.unpack_from(body)
        return vcpu, wait, not (p1 or p2 or p3)

    def parse_phys(self, payload):
        gpa, size = V7_PHYS_REQ.unpack_from(payload)
        return gpa, size, True, V7_PHYS_REQ.size

    def pack_vcpu_event(self, seq, event, vcpu, state, payload=b""):
        # One pack for the message header and struct kvmi_event's common part (event path).
        size = V7_EVENT.size + len(state) + len(payload)
        if size > MAX_MSG_SIZE:
            raise ProtocolError(f"kvmi-v7 event: {size} bytes > {MAX_MSG_SIZE}")
        return _V7_EVENT_PREFIX.pack(C7.EVENT, size, seq & 0xFFFFFFFF, V7_EVENT_SIZE, vcpu,
                                     self.event_ids[event]) + state + payload

    def pack_vm_event(self, seq, event):
        # UNHOOK: message 1 with the whole common event struct, vCPU 0, arch zeroed.
        return pack_message(C7.EVENT, seq, V7_EVENT.pack(V7_EVENT_SIZE, 0, self.event_ids[event])
                            + bytes(STATE_SIZE))


V12 = _V12()
V7 = _V7()
DIALECTS = {"v12": V12, "v7": V7}


def dialect(name: str) -> Dialect:
    """The dialect called `name` ('v7' or 'v12'); KeyError otherwise."""
    return DIALECTS[name]
