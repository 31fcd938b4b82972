"""The C MSR event path of a Machine's introspection sessions (csrc/kvmi_event.h,
docs/introspection.md §5, "MSR events in C").

`make_port()` makes one session's `EventPort` (kvmgate.engine._engine) when the C engine is
built, the C handler loop runs Python handlers (kvmgate.engine.runloop.HANDLERS_IN_C), the
socket is a Unix stream socket (one send(2) of a whole event is one skb there, so it never
interleaves with a message another thread sends) and KVM copies the registers into kvm_run
(KVM_CAP_SYNC_REGS).  Otherwise None, and every event goes through the server in Python.

The port is armed with the dialect's MSR event message as a template; `msr_event_layout` finds
where the seq and the vCPU go by packing the message twice with the dialect's own packer (so
the layouts are written once, in abi.py).  MachineBackend registers the port with its write
interception (`Machine.intercept_msr_writes(..., native=port)`), the gate hands it to the C
handler loop with the MSRs routed to the interception, and the server keeps the port's
per-vCPU table of wanted MSRs current (`IntrospectionServer.publish`).

`ENABLED = False` turns the path off for new sessions (the benchmark's Python rows, tests).
"""
from __future__ import annotations

import socket

from ..engine import binding, runloop
from . import inbox
from .ids import Event
from .protocol import MSR_EVENT, STATE_SIZE

__all__ = ["ENABLED", "make_port", "msr_event_layout"]

ENABLED = True


def msr_event_layout(abi) -> tuple[bytes, int, int, int, int]:
    """(template, seq_at, vcpu_at, state_at, payload_at) of `abi`'s MSR event message: the
    message with seq 0, vCPU 0, a zero state block and a zero payload, and the byte offsets
    of the u32 seq, the u16 vCPU, the state block and the payload."""
    state, payload = bytes(STATE_SIZE), bytes(MSR_EVENT.size)
    zero = abi.pack_vcpu_event(0, Event.MSR, 0, state, payload)
    marked = abi.pack_vcpu_event(0xA5A5A5A5, Event.MSR, 0x5A5A, state, payload)
    seq_at, vcpu_at = marked.find(b"\xa5" * 4), marked.find(b"\x5a\x5a")
    changed = {i for i in range(len(zero)) if zero[i] != marked[i]}
    if seq_at < 0 or vcpu_at < 0 or \
            changed != {*range(seq_at, seq_at + 4), vcpu_at, vcpu_at + 1}:
        raise ValueError(f"{abi.name}: cannot find the seq and vCPU of an MSR event")
    payload_at = len(zero) - len(payload)
    return zero, seq_at, vcpu_at, payload_at - STATE_SIZE, payload_at


def make_port(nvcpus: int, sock, abi, event_timeout: float | None, sync_regs: bool):
    """An armed EventPort for the session on `sock`, or None (see the module docstring)."""
    if not (ENABLED and sync_regs and runloop.HANDLERS_IN_C and binding.available()):
        return None
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            return None
        fd = sock.fileno()
    except (AttributeError, OSError):
        return None
    template, seq_at, vcpu_at, state_at, payload_at = msr_event_layout(abi)
    port = binding.native().EventPort(nvcpus)
    timeout_ns = -1 if event_timeout is None else max(0, int(event_timeout * 1e9))
    port.arm(fd, template, seq_at, vcpu_at, state_at, payload_at, abi.reply_id,
             abi.event_wire(Event.MSR), inbox.POLL_NS, timeout_ns)
    return port
