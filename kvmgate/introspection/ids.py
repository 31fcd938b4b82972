"""KVMI message ids, event ids, actions and error codes of the v12 patch series (the ABI the
owner's permissions are written in; docs/introspection.md) with their names.

Command and Event are IntEnums whose values are the v12 wire ids; they are also the *meaning*
of a command or event for the other ABI (abi.py maps libkvmi's kvmi-v7 ids onto them), so the
owner's permissions apply to both ABIs by meaning.  The `*_name` helpers never raise: an
unknown value gets a generic name such as "command(1234)".
"""
from __future__ import annotations

import enum


def VM(n: int) -> int:
    """Id of the n-th VM message (even)."""
    return n << 1


def VCPU(n: int) -> int:
    """Id of the n-th vCPU message (odd)."""
    return (n << 1) | 1


def msr_write_is_event(old: int, new: int) -> bool:
    """KVMI's rule for a write to an MSR the tool controls (docs/introspection.md §3, MSR):
    only a write that changes the value is an MSR event.  The one place Python states it (the
    server, and the backends that skip the event's work early); csrc/kvmi_event.c is C's."""
    return old != new


# Message ids the owner uses to send events (message 0 = VM event, 1 = vCPU event/its reply).
MSG_VM_EVENT = VM(0)
MSG_VCPU_EVENT = VCPU(0)


class Command(enum.IntEnum):
    """v12 commands (VM messages even, vCPU messages odd)."""
    GET_VERSION = VM(1)
    VM_CHECK_COMMAND = VM(2)
    VM_CHECK_EVENT = VM(3)
    VM_GET_INFO = VM(4)
    VM_CONTROL_EVENTS = VM(5)
    VM_READ_PHYSICAL = VM(6)
    VM_WRITE_PHYSICAL = VM(7)
    VM_PAUSE_VCPU = VM(8)
    VM_CONTROL_CLEANUP = VM(9)
    VM_SET_PAGE_ACCESS = VM(10)
    VCPU_GET_INFO = VCPU(1)
    VCPU_CONTROL_EVENTS = VCPU(2)
    VCPU_GET_REGISTERS = VCPU(3)
    VCPU_SET_REGISTERS = VCPU(4)
    VCPU_GET_CPUID = VCPU(5)
    VCPU_CONTROL_CR = VCPU(6)
    VCPU_INJECT_EXCEPTION = VCPU(7)
    VCPU_GET_XCR = VCPU(8)
    VCPU_GET_XSAVE = VCPU(9)
    VCPU_SET_XSAVE = VCPU(10)
    VCPU_GET_MTRR_TYPE = VCPU(11)
    VCPU_CONTROL_MSR = VCPU(12)
    VCPU_CONTROL_SINGLESTEP = VCPU(13)
    VCPU_TRANSLATE_GVA = VCPU(14)


class Event(enum.IntEnum):
    """v12 events: VM_EVENT_UNHOOK (even), vCPU events (odd)."""
    UNHOOK = VM(0)
    PAUSE = VCPU(0)
    HYPERCALL = VCPU(1)
    BREAKPOINT = VCPU(2)
    CR = VCPU(3)
    TRAP = VCPU(4)
    XSETBV = VCPU(5)
    DESCRIPTOR = VCPU(6)
    MSR = VCPU(7)
    PF = VCPU(8)
    SINGLESTEP = VCPU(9)


# Module-level names (the spellings the rest of kvmgate and its users know).
GET_VERSION = Command.GET_VERSION
VM_CHECK_COMMAND = Command.VM_CHECK_COMMAND
VM_CHECK_EVENT = Command.VM_CHECK_EVENT
VM_GET_INFO = Command.VM_GET_INFO
VM_CONTROL_EVENTS = Command.VM_CONTROL_EVENTS
VM_READ_PHYSICAL = Command.VM_READ_PHYSICAL
VM_WRITE_PHYSICAL = Command.VM_WRITE_PHYSICAL
VM_PAUSE_VCPU = Command.VM_PAUSE_VCPU
VM_CONTROL_CLEANUP = Command.VM_CONTROL_CLEANUP
VM_SET_PAGE_ACCESS = Command.VM_SET_PAGE_ACCESS
VCPU_GET_INFO = Command.VCPU_GET_INFO
VCPU_CONTROL_EVENTS = Command.VCPU_CONTROL_EVENTS
VCPU_GET_REGISTERS = Command.VCPU_GET_REGISTERS
VCPU_SET_REGISTERS = Command.VCPU_SET_REGISTERS
VCPU_GET_CPUID = Command.VCPU_GET_CPUID
VCPU_CONTROL_CR = Command.VCPU_CONTROL_CR
VCPU_INJECT_EXCEPTION = Command.VCPU_INJECT_EXCEPTION
VCPU_GET_XCR = Command.VCPU_GET_XCR
VCPU_GET_XSAVE = Command.VCPU_GET_XSAVE
VCPU_SET_XSAVE = Command.VCPU_SET_XSAVE
VCPU_GET_MTRR_TYPE = Command.VCPU_GET_MTRR_TYPE
VCPU_CONTROL_MSR = Command.VCPU_CONTROL_MSR
VCPU_CONTROL_SINGLESTEP = Command.VCPU_CONTROL_SINGLESTEP
VCPU_TRANSLATE_GVA = Command.VCPU_TRANSLATE_GVA

VM_EVENT_UNHOOK = Event.UNHOOK
VCPU_EVENT_PAUSE = Event.PAUSE
VCPU_EVENT_HYPERCALL = Event.HYPERCALL
VCPU_EVENT_BREAKPOINT = Event.BREAKPOINT
VCPU_EVENT_CR = Event.CR
VCPU_EVENT_TRAP = Event.TRAP
VCPU_EVENT_XSETBV = Event.XSETBV
VCPU_EVENT_DESCRIPTOR = Event.DESCRIPTOR
VCPU_EVENT_MSR = Event.MSR
VCPU_EVENT_PF = Event.PF
VCPU_EVENT_SINGLESTEP = Event.SINGLESTEP

COMMAND_NAMES = {c: c.name for c in Command}
# Every v12 command: what the owner may allow (docs/introspection.md, "2. Messages and commands").
COMMANDS = frozenset(Command)
# Commands that can never be disallowed.
ALWAYS_ALLOWED = frozenset({GET_VERSION, VM_CHECK_COMMAND, VM_CHECK_EVENT})

EVENT_NAMES = {e: e.name for e in Event}
EVENTS = frozenset(Event)
VM_EVENTS = frozenset(e for e in EVENTS if not e & 1)
VCPU_EVENTS = frozenset(e for e in EVENTS if e & 1)


class Action(enum.IntEnum):
    """Reply actions for vCPU events (the same in both ABIs)."""
    CONTINUE = 0
    RETRY = 1
    CRASH = 2


CONTINUE = Action.CONTINUE
RETRY = Action.RETRY
CRASH = Action.CRASH


class Error(enum.IntEnum):
    """KVM error codes, negated in a reply's `err` (the same in both ABIs)."""
    KVM_EPERM = 1
    KVM_ENOENT = 2
    KVM_E2BIG = 7
    KVM_EAGAIN = 11
    KVM_ENOMEM = 12
    KVM_EFAULT = 14
    KVM_EBUSY = 16
    KVM_EINVAL = 22
    KVM_EOPNOTSUPP = 95
    KVM_ENOSYS = 1000


KVM_EPERM = Error.KVM_EPERM
KVM_ENOENT = Error.KVM_ENOENT
KVM_E2BIG = Error.KVM_E2BIG
KVM_EAGAIN = Error.KVM_EAGAIN
KVM_ENOMEM = Error.KVM_ENOMEM
KVM_EFAULT = Error.KVM_EFAULT
KVM_EBUSY = Error.KVM_EBUSY
KVM_EINVAL = Error.KVM_EINVAL
KVM_EOPNOTSUPP = Error.KVM_EOPNOTSUPP
KVM_ENOSYS = Error.KVM_ENOSYS

ERROR_NAMES = {e: e.name for e in Error}


def command_name(cid: object) -> str:
    return COMMAND_NAMES.get(cid, f"command({cid})") if isinstance(cid, int) else repr(cid)


def message_name(mid: object) -> str:
    """Name of any v12 message id: a command, or the VM/vCPU event message (0/1)."""
    if mid == MSG_VM_EVENT:
        return "VM_EVENT"
    if mid == MSG_VCPU_EVENT:
        return "VCPU_EVENT"
    return command_name(mid)


def event_name(eid: object) -> str:
    return EVENT_NAMES.get(eid, f"event({eid})") if isinstance(eid, int) else repr(eid)


def action_name(action: object) -> str:
    try:
        return Action(action).name
    except (ValueError, TypeError):
        return f"action({action!r})"


def error_name(code: object) -> str:
    """Name of a KVM error code, given negated (as in a reply) or not; 0 is "OK"."""
    if code == 0:
        return "OK"
    if isinstance(code, int):
        name = ERROR_NAMES.get(abs(code))
        if name:
            return name
    return f"error({code!r})"
