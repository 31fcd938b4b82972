"""KVMI message ids, event ids, actions and error codes (spec §2, §3) with their names.

The `*_name` helpers never raise: an unknown value gets a generic name such as "command(1234)".
"""
from __future__ import annotations

import enum


def VM(n: int) -> int:
    """Id of the n-th VM message (even)."""
    return n << 1


def VCPU(n: int) -> int:
    """Id of the n-th vCPU message (odd)."""
    return (n << 1) | 1


# Message ids the owner uses to send events (message 0 = VM event, 1 = vCPU event/its reply).
MSG_VM_EVENT = VM(0)
MSG_VCPU_EVENT = VCPU(0)

# Commands (v12 numbering).
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

COMMAND_NAMES = {
    GET_VERSION: "GET_VERSION",
    VM_CHECK_COMMAND: "VM_CHECK_COMMAND",
    VM_CHECK_EVENT: "VM_CHECK_EVENT",
    VM_GET_INFO: "VM_GET_INFO",
    VM_CONTROL_EVENTS: "VM_CONTROL_EVENTS",
    VM_READ_PHYSICAL: "VM_READ_PHYSICAL",
    VM_WRITE_PHYSICAL: "VM_WRITE_PHYSICAL",
    VM_PAUSE_VCPU: "VM_PAUSE_VCPU",
    VM_CONTROL_CLEANUP: "VM_CONTROL_CLEANUP",
    VM_SET_PAGE_ACCESS: "VM_SET_PAGE_ACCESS",
    VCPU_GET_INFO: "VCPU_GET_INFO",
    VCPU_CONTROL_EVENTS: "VCPU_CONTROL_EVENTS",
    VCPU_GET_REGISTERS: "VCPU_GET_REGISTERS",
    VCPU_SET_REGISTERS: "VCPU_SET_REGISTERS",
    VCPU_GET_CPUID: "VCPU_GET_CPUID",
    VCPU_CONTROL_CR: "VCPU_CONTROL_CR",
    VCPU_INJECT_EXCEPTION: "VCPU_INJECT_EXCEPTION",
    VCPU_GET_XCR: "VCPU_GET_XCR",
    VCPU_GET_XSAVE: "VCPU_GET_XSAVE",
    VCPU_SET_XSAVE: "VCPU_SET_XSAVE",
    VCPU_GET_MTRR_TYPE: "VCPU_GET_MTRR_TYPE",
    VCPU_CONTROL_MSR: "VCPU_CONTROL_MSR",
    VCPU_CONTROL_SINGLESTEP: "VCPU_CONTROL_SINGLESTEP",
    VCPU_TRANSLATE_GVA: "VCPU_TRANSLATE_GVA",
}
# Every v12 command: what the owner may allow (spec §1 "known command").
COMMANDS = frozenset(COMMAND_NAMES)
# Commands that can never be disallowed (spec §1).
ALWAYS_ALLOWED = frozenset({GET_VERSION, VM_CHECK_COMMAND, VM_CHECK_EVENT})

# Events (spec §3).
VM_EVENT_UNHOOK = VM(0)
VCPU_EVENT_PAUSE = VCPU(0)
VCPU_EVENT_HYPERCALL = VCPU(1)
VCPU_EVENT_BREAKPOINT = VCPU(2)
VCPU_EVENT_CR = VCPU(3)
VCPU_EVENT_TRAP = VCPU(4)
VCPU_EVENT_XSETBV = VCPU(5)
VCPU_EVENT_DESCRIPTOR = VCPU(6)
VCPU_EVENT_MSR = VCPU(7)
VCPU_EVENT_PF = VCPU(8)
VCPU_EVENT_SINGLESTEP = VCPU(9)

EVENT_NAMES = {
    VM_EVENT_UNHOOK: "UNHOOK",
    VCPU_EVENT_PAUSE: "PAUSE",
    VCPU_EVENT_HYPERCALL: "HYPERCALL",
    VCPU_EVENT_BREAKPOINT: "BREAKPOINT",
    VCPU_EVENT_CR: "CR",
    VCPU_EVENT_TRAP: "TRAP",
    VCPU_EVENT_XSETBV: "XSETBV",
    VCPU_EVENT_DESCRIPTOR: "DESCRIPTOR",
    VCPU_EVENT_MSR: "MSR",
    VCPU_EVENT_PF: "PF",
    VCPU_EVENT_SINGLESTEP: "SINGLESTEP",
}
EVENTS = frozenset(EVENT_NAMES)
VM_EVENTS = frozenset(e for e in EVENTS if not e & 1)
VCPU_EVENTS = frozenset(e for e in EVENTS if e & 1)


class Action(enum.IntEnum):
    """Reply actions for vCPU events (spec §3)."""
    CONTINUE = 0
    RETRY = 1
    CRASH = 2


CONTINUE = Action.CONTINUE
RETRY = Action.RETRY
CRASH = Action.CRASH

# Error codes, negated in a reply's `err` (spec §2).
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

ERROR_NAMES = {
    KVM_EPERM: "KVM_EPERM",
    KVM_ENOENT: "KVM_ENOENT",
    KVM_E2BIG: "KVM_E2BIG",
    KVM_EAGAIN: "KVM_EAGAIN",
    KVM_ENOMEM: "KVM_ENOMEM",
    KVM_EFAULT: "KVM_EFAULT",
    KVM_EBUSY: "KVM_EBUSY",
    KVM_EINVAL: "KVM_EINVAL",
    KVM_EOPNOTSUPP: "KVM_EOPNOTSUPP",
    KVM_ENOSYS: "KVM_ENOSYS",
}


def command_name(cid: object) -> str:
    return COMMAND_NAMES.get(cid, f"command({cid})") if isinstance(cid, int) else repr(cid)


def message_name(mid: object) -> str:
    """Name of any message id: a command, or the VM/vCPU event message (0/1)."""
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
