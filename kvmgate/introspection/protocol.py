"""KVMI wire format of the v12 series: framing, the streaming `Reader`, and the payload codecs
(docs/introspection.md); abi.py adds the kvmi-v7 layouts that differ.

Host byte order ("=" structs, no implicit alignment).  `fixed()` reads a struct from a buffer
that may be short (missing bytes read as zero): the tool side and event replies use it; the
server refuses command payloads shorter than their request (see server.py).
"""
from __future__ import annotations

import struct
from struct import Struct
from typing import NamedTuple, Sequence

from . import ids

VERSION = 1
MAX_MSG_SIZE = 8184          # largest `size` (bytes after the header)
PAGE_SIZE = 4096

HEADER = Struct("=HHI")      # {u16 id; u16 size; u32 seq}
ERR = Struct("=iI")          # command reply: {s32 err; u32 padding}
VCPU_HDR = Struct("=HHI")    # {u16 vcpu; u16 pad; u32 pad}

# Requests (after the header and, for vCPU commands, after VCPU_HDR).
CHECK_REQ = Struct("=HHI")           # VM_CHECK_COMMAND / VM_CHECK_EVENT {u16 id; u16; u32}
CONTROL_EVENTS_REQ = Struct("=HBBI")  # {u16 event_id; u8 enable; u8; u32}
READ_PHYS_REQ = Struct("=QHHI")      # {u64 gpa; u16 size; u16; u32}
WRITE_PHYS_REQ = READ_PHYS_REQ       # ... then `size` bytes of data
PAUSE_REQ = Struct("=HBBI")          # {u16 vcpu; u8 wait; u8; u32}
GET_REGS_REQ = Struct("=HHI")        # {u16 nmsrs; u16; u32} then u32 msrs[nmsrs]
CONTROL_MSR_REQ = Struct("=BBHI")    # {u8 enable; u8; u16; u32 msr}
GET_CPUID_REQ = Struct("=II")        # {u32 function; u32 index}
INJECT_REQ = Struct("=BBHIQ")        # {u8 nr; u8; u16; u32 error_code; u64 address}

# Replies.
VERSION_RPL = Struct("=II8s")        # {u32 version; u32 max_msg_size; u8 features[8]}
GET_INFO_RPL = Struct("=I12x")       # {u32 vcpu_count; u32 pad[3]}
VCPU_INFO_RPL = Struct("=Q")         # {u64 tsc_speed}
GET_CPUID_RPL = Struct("=IIII")      # {u32 eax, ebx, ecx, edx}
REGS_HDR = Struct("=II")             # {u32 mode; u32 pad}
MSRS_HDR = Struct("=II")             # struct kvm_msrs {u32 nmsrs; u32 pad}
MSR_ENTRY = Struct("=IIQ")           # struct kvm_msr_entry {u32 index; u32 reserved; u64 data}

# Events.
EVENT_HDR = Struct("=HHHH")          # {u16 event; u16 pad[3]}
VCPU_EVENT_HDR = Struct("=HHI")      # {u16 size; u16 vcpu; u32 pad}
EVENT_REPLY = Struct("=BBHI")        # {u8 action; u8 event; u16; u32}
MSR_EVENT = Struct("=IIQQ")          # {u32 msr; u32 pad; u64 old_value; u64 new_value}
MSR_REPLY = Struct("=Q")             # {u64 new_val}

REGS_SIZE = 144
SREGS_SIZE = 312
STATE = Struct(f"=B7x{REGS_SIZE}s{SREGS_SIZE}s9Q")   # the 536-byte vCPU state block
STATE_SIZE = STATE.size
VCPU_EVENT_SIZE = VCPU_EVENT_HDR.size + STATE_SIZE     # the `size` field of VCPU_EVENT_HDR: 544
EVENT_REPLY_PREFIX = VCPU_HDR.size + EVENT_REPLY.size   # before the event's reply payload
MAX_GET_REGS_MSRS = (MAX_MSG_SIZE - ERR.size - REGS_HDR.size - REGS_SIZE - SREGS_SIZE
                     - MSRS_HDR.size) // MSR_ENTRY.size  # 481: the reply must fit one message

# Size of each event's reply payload (after the common reply); longer replies break the protocol.
REPLY_SIZES = {ids.VCPU_EVENT_MSR: MSR_REPLY.size}

STATE_MSRS = ("sysenter_cs", "sysenter_esp", "sysenter_eip", "efer", "star", "lstar", "cstar",
              "pat", "shadow_gs")


class ProtocolError(Exception):
    """Malformed input on the introspection socket: the connection must be closed."""


class Message(NamedTuple):
    id: int
    seq: int
    payload: bytes


def pack_message(mid: int, seq: int, payload: bytes = b"") -> bytes:
    """Header + payload, ready for a single write."""
    if len(payload) > MAX_MSG_SIZE:
        raise ProtocolError(f"{ids.message_name(mid)}: {len(payload)} bytes > {MAX_MSG_SIZE}")
    return HEADER.pack(mid, len(payload), seq & 0xFFFFFFFF) + payload


def pack_reply(mid: int, seq: int, err: int, data: bytes = b"") -> bytes:
    """A command reply: {s32 err; u32 pad} then `data` only when err == 0."""
    return pack_message(mid, seq, ERR.pack(err, 0) + (data if err == 0 else b""))


def fixed(st: Struct, buf: bytes, offset: int = 0) -> tuple:
    """Unpack `st` at `offset`; missing bytes read as zero, extra ignored."""
    chunk = buf[offset:offset + st.size]
    if len(chunk) < st.size:
        chunk = bytes(chunk) + bytes(st.size - len(chunk))
    return st.unpack(chunk)


def msr_valid(msr: int) -> bool:
    """MSRs VCPU_CONTROL_MSR accepts: 0-0x1fff and 0xc0000000-0xc0001fff."""
    return 0 <= msr <= 0x1FFF or 0xC0000000 <= msr <= 0xC0001FFF


class Reader:
    """Reassembles messages from a stream socket (or from bytes given to `feed`).

    `read()` returns the next `Message`, or None at EOF on a message boundary; it raises
    `ProtocolError` for a size over the limit or EOF inside a message.
    """

    def __init__(self, sock=None, max_size: int = MAX_MSG_SIZE, chunk: int = 65536):
        self._sock = sock
        self._max = max_size
        self._chunk = chunk
        self._buf = bytearray()
        self._eof = False

    def feed(self, data: bytes) -> None:
        self._buf += data

    def feed_eof(self) -> None:
        self._eof = True

    def pending(self) -> int:
        """Bytes buffered but not yet returned as a message."""
        return len(self._buf)

    def next(self) -> Message | None:
        """The next complete buffered message, or None if more bytes are needed."""
        buf = self._buf
        if len(buf) < HEADER.size:
            return None
        mid, size, seq = HEADER.unpack_from(buf)
        if size > self._max:
            raise ProtocolError(f"{ids.message_name(mid)}: size {size} > {self._max}")
        end = HEADER.size + size
        if len(buf) < end:
            return None
        payload = bytes(buf[HEADER.size:end])
        del buf[:end]
        return Message(mid, seq, payload)

    def take(self, data: bytes) -> Message | None:
        """feed(data), then next(); when nothing is buffered and `data` is exactly one message
        (an event reply read by its vCPU), without going through the buffer."""
        if not self._buf and len(data) >= HEADER.size:
            mid, size, seq = HEADER.unpack_from(data)
            if len(data) == HEADER.size + size and size <= self._max:
                return Message(mid, seq, data[HEADER.size:])
        self._buf += data
        return self.next()

    def read(self) -> Message | None:
        while True:
            msg = self.next()
            if msg is not None:
                return msg
            if self._eof or self._sock is None:
                if self._eof and self._buf:
                    raise ProtocolError(f"EOF inside a message ({len(self._buf)} bytes)")
                return None
            data = self._sock.recv(self._chunk)
            if not data:
                self._eof = True
            else:
                self._buf += data


# --- kvm_regs / kvm_sregs -------------------------------------------------------------------

REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
REGS = Struct("=18Q")


class Regs(NamedTuple):
    """struct kvm_regs: 18 u64 (144 bytes)."""
    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0

    def pack(self) -> bytes:
        return REGS.pack(*self)

    @classmethod
    def unpack(cls, buf: bytes) -> "Regs":
        return cls(*fixed(REGS, buf))


class Segment(NamedTuple):
    """struct kvm_segment (24 bytes)."""
    base: int = 0
    limit: int = 0
    selector: int = 0
    type: int = 0
    present: int = 0
    dpl: int = 0
    db: int = 0
    s: int = 0
    l: int = 0  # noqa: E741 (the kernel's field name)
    g: int = 0
    avl: int = 0
    unusable: int = 0


class Dtable(NamedTuple):
    """struct kvm_dtable (16 bytes)."""
    base: int = 0
    limit: int = 0


SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
SREGS = Struct("=" + "QIH9Bx" * 8 + "QH6x" * 2 + "7Q" + "4Q")
assert SREGS.size == SREGS_SIZE and REGS.size == REGS_SIZE and STATE_SIZE == 536


class Sregs(NamedTuple):
    """struct kvm_sregs (312 bytes): 8 segments, gdt, idt, control registers, interrupt bitmap."""
    cs: Segment = Segment()
    ds: Segment = Segment()
    es: Segment = Segment()
    fs: Segment = Segment()
    gs: Segment = Segment()
    ss: Segment = Segment()
    tr: Segment = Segment()
    ldt: Segment = Segment()
    gdt: Dtable = Dtable()
    idt: Dtable = Dtable()
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0
    interrupt_bitmap: tuple = (0, 0, 0, 0)

    def pack(self) -> bytes:
        vals: list[int] = []
        for seg in self[:8]:
            vals.extend(seg)
        for dt in (self.gdt, self.idt):
            vals.extend(dt)
        vals += [self.cr0, self.cr2, self.cr3, self.cr4, self.cr8, self.efer, self.apic_base]
        vals.extend(self.interrupt_bitmap)
        return SREGS.pack(*vals)

    @classmethod
    def unpack(cls, buf: bytes) -> "Sregs":
        v = fixed(SREGS, buf)
        segs = [Segment(*v[i * 12:i * 12 + 12]) for i in range(8)]
        gdt, idt = Dtable(*v[96:98]), Dtable(*v[98:100])
        return cls(*segs, gdt, idt, *v[100:107], tuple(v[107:111]))


# --- vCPU state, events and replies ---------------------------------------------------------

class VcpuState(NamedTuple):
    """The 536-byte block of every vCPU event: mode (2/4/8), kvm_regs, kvm_sregs, 9 MSRs."""
    mode: int
    regs: bytes
    sregs: bytes
    msrs: tuple = (0,) * 9

    def pack(self) -> bytes:
        return STATE.pack(self.mode, bytes(self.regs), bytes(self.sregs), *self.msrs)

    @classmethod
    def unpack(cls, buf: bytes) -> "VcpuState":
        v = fixed(STATE, buf)
        return cls(v[0], v[1], v[2], tuple(v[3:]))

    def msr(self, name: str) -> int:
        return self.msrs[STATE_MSRS.index(name)]


def pack_state(mode: int, regs, sregs, msrs: Sequence[int] = (0,) * 9) -> bytes:
    """The state block from raw (or Regs/Sregs) register sets."""
    if isinstance(regs, Regs):
        regs = regs.pack()
    if isinstance(sregs, Sregs):
        sregs = sregs.pack()
    return STATE.pack(mode, bytes(regs), bytes(sregs), *msrs)


def state_bytes(state) -> bytes:
    """Accepts packed bytes, a VcpuState, a callable returning either, or None (zeros)."""
    if callable(state):
        state = state()
    if state is None:
        return bytes(STATE_SIZE)
    if isinstance(state, VcpuState):
        return state.pack()
    state = bytes(state)
    if len(state) != STATE_SIZE:
        raise ValueError(f"vCPU state must be {STATE_SIZE} bytes, not {len(state)}")
    return state


_VCPU_EVENT_PREFIX = Struct("=HHI" "HHHH" "HHI")   # HEADER, EVENT_HDR, VCPU_EVENT_HDR


def pack_vcpu_event(seq: int, event: int, vcpu: int, state: bytes, payload: bytes = b"") -> bytes:
    """One vCPU event message: header, event and vCPU headers in one pack (the event path)."""
    size = EVENT_HDR.size + VCPU_EVENT_HDR.size + len(state) + len(payload)
    if size > MAX_MSG_SIZE:
        raise ProtocolError(f"{ids.message_name(ids.MSG_VCPU_EVENT)}: {size} bytes > "
                            f"{MAX_MSG_SIZE}")
    return _VCPU_EVENT_PREFIX.pack(ids.MSG_VCPU_EVENT, size, seq & 0xFFFFFFFF, event, 0, 0, 0,
                                   VCPU_EVENT_SIZE, vcpu, 0) + state + payload


def pack_vm_event(seq: int, event: int) -> bytes:
    return pack_message(ids.MSG_VM_EVENT, seq, EVENT_HDR.pack(event, 0, 0, 0))


def pack_event_reply(seq: int, vcpu: int, action: int, event: int, data: bytes = b"") -> bytes:
    return pack_message(ids.MSG_VCPU_EVENT, seq,
                        VCPU_HDR.pack(vcpu, 0, 0) + EVENT_REPLY.pack(action, event, 0, 0) + data)


class EventReply(NamedTuple):
    """A parsed vCPU event reply."""
    vcpu: int
    action: int
    event: int
    data: bytes


_EVENT_REPLY_COMMON = Struct("=HHI" "BBHI")        # VCPU_HDR, EVENT_REPLY


def parse_event_reply(payload: bytes) -> EventReply:
    """Strict: the common part must be complete with zero padding (else ProtocolError)."""
    if len(payload) < EVENT_REPLY_PREFIX:
        raise ProtocolError(f"event reply of {len(payload)} bytes")
    vcpu, p1, p2, action, event, p3, p4 = _EVENT_REPLY_COMMON.unpack_from(payload)
    if p1 or p2 or p3 or p4:
        raise ProtocolError("non-zero padding in an event reply")
    return EventReply(vcpu, action, event, payload[EVENT_REPLY_PREFIX:])


class ParsedEvent(NamedTuple):
    """An event as a tool sees it.  VM events have vcpu None and no state."""
    seq: int
    event: int
    vcpu: int | None
    state: VcpuState | None
    payload: bytes


def parse_event(msg: Message) -> ParsedEvent:
    """Decode a VM (message 0) or vCPU (message 1) event."""
    if len(msg.payload) < EVENT_HDR.size:
        raise ProtocolError(f"event of {len(msg.payload)} bytes")
    event = EVENT_HDR.unpack_from(msg.payload)[0]
    if msg.id == ids.MSG_VM_EVENT:
        return ParsedEvent(msg.seq, event, None, None, msg.payload[EVENT_HDR.size:])
    if msg.id != ids.MSG_VCPU_EVENT:
        raise ProtocolError(f"{ids.message_name(msg.id)} is not an event")
    if len(msg.payload) < EVENT_HDR.size + VCPU_EVENT_HDR.size:
        raise ProtocolError(f"vCPU event of {len(msg.payload)} bytes")
    size, vcpu, _ = VCPU_EVENT_HDR.unpack_from(msg.payload, EVENT_HDR.size)
    start = EVENT_HDR.size + VCPU_EVENT_HDR.size
    end = EVENT_HDR.size + size
    if size < VCPU_EVENT_HDR.size or end > len(msg.payload):
        raise ProtocolError(f"vCPU event size {size}")
    state = VcpuState.unpack(msg.payload[start:end])
    return ParsedEvent(msg.seq, event, vcpu, state, msg.payload[end:])


class MsrEventData(NamedTuple):
    msr: int
    old: int
    new: int


def parse_msr_event(payload: bytes) -> MsrEventData:
    msr, _, old, new = fixed(MSR_EVENT, payload)
    return MsrEventData(msr, old, new)


# --- VCPU_GET_REGISTERS ---------------------------------------------------------------------

class Registers(NamedTuple):
    mode: int
    regs: Regs
    sregs: Sregs
    msrs: list       # [(index, value)]
    raw_sregs: bytes = b""


def pack_get_regs_request(msrs: Sequence[int]) -> bytes:
    return GET_REGS_REQ.pack(len(msrs), 0, 0) + struct.pack(f"={len(msrs)}I", *msrs)


def pack_get_regs_reply(mode: int, regs: bytes, sregs: bytes, msrs: Sequence[tuple]) -> bytes:
    regs, sregs = bytes(regs), bytes(sregs)
    if len(regs) != REGS_SIZE or len(sregs) != SREGS_SIZE:
        raise ValueError(f"regs/sregs must be {REGS_SIZE}/{SREGS_SIZE} bytes")
    parts = [REGS_HDR.pack(mode, 0), regs, sregs, MSRS_HDR.pack(len(msrs), 0)]
    parts += [MSR_ENTRY.pack(idx, 0, val) for idx, val in msrs]
    return b"".join(parts)


def parse_get_regs_reply(data: bytes) -> Registers:
    mode, _ = fixed(REGS_HDR, data)
    off = REGS_HDR.size
    raw_regs = data[off:off + REGS_SIZE]
    raw_sregs = bytes(data[off + REGS_SIZE:off + REGS_SIZE + SREGS_SIZE])
    off += REGS_SIZE + SREGS_SIZE
    n, _ = fixed(MSRS_HDR, data, off)
    off += MSRS_HDR.size
    msrs = []
    for i in range(n):
        if off + MSR_ENTRY.size > len(data):
            raise ProtocolError(f"VCPU_GET_REGISTERS reply truncated at MSR {i} of {n}")
        idx, _, val = MSR_ENTRY.unpack_from(data, off)
        msrs.append((idx, val))
        off += MSR_ENTRY.size
    return Registers(mode, Regs.unpack(raw_regs), Sregs.unpack(raw_sregs), msrs, raw_sregs)
