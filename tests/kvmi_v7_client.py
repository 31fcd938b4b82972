"""An introspection tool written from libkvmi's headers (include/linux/kvmi.h,
include/linux/x86_64/asm/kvmi.h, src/kvmi.c; kvmi-v7 ABI), independent of kvmgate's codec:
nothing here imports kvmgate, so a mistake shared with kvmgate's own codec cannot pass.

It listens like `kvmi_init_unix_socket`, answers QEMU's handshake, and then speaks the wire
protocol: requests with the flat kvmi-v7 ids, events queued while a reply is awaited (as
libkvmi's recv_reply_header does), event replies as message 0, and batches framed by
CONTROL_CMD_RESPONSE as `kvmi_pause_all_vcpus` builds them.
"""
from __future__ import annotations

import itertools
import os
import socket
import struct
from collections import deque

# enum in include/linux/kvmi.h
EVENT_REPLY, EVENT = 0, 1
GET_VERSION, CHECK_COMMAND, CHECK_EVENT, GET_GUEST_INFO, GET_VCPU_INFO = 2, 3, 4, 5, 6
PAUSE_VCPU, CONTROL_VM_EVENTS, CONTROL_EVENTS, CONTROL_CR, CONTROL_MSR = 7, 8, 9, 10, 11
GET_REGISTERS, SET_REGISTERS, GET_CPUID, GET_XSAVE = 13, 14, 15, 16
READ_PHYSICAL, WRITE_PHYSICAL, INJECT_EXCEPTION = 17, 18, 19
SET_PAGE_ACCESS, CONTROL_CMD_RESPONSE, GET_MAX_GFN = 21, 27, 29
EV_UNHOOK, EV_CR, EV_MSR, EV_PF, EV_PAUSE_VCPU = 0, 1, 2, 6, 10
CONTINUE, RETRY, CRASH = 0, 1, 2
# KVM error codes (include/uapi/linux/kvm_para.h)
KVM_EPERM, KVM_ENOENT, KVM_EINVAL, KVM_EOPNOTSUPP = 1, 2, 22, 95

HDR = struct.Struct("<HHI")                  # struct kvmi_msg_hdr
ERRC = struct.Struct("<iI")                  # struct kvmi_error_code
VCPU_HDR = struct.Struct("<HHI")             # struct kvmi_vcpu_hdr
QEMU2INTRO = struct.Struct("<I16sIq64s")     # struct kvmi_qemu2introspector
INTRO2QEMU = struct.Struct("<I20s")          # struct kvmi_introspector2qemu
EVENT_COMMON = struct.Struct("<HHB3x")       # struct kvmi_event up to arch
ARCH_SIZE = 8 + 144 + 312 + 9 * 8            # struct kvmi_event_arch
MSR_EV = struct.Struct("<IIQQ")              # struct kvmi_event_msr
EV_REPLY = struct.Struct("<BBHI")            # struct kvmi_event_reply
REGS = struct.Struct("<18Q")                 # struct kvm_regs
assert QEMU2INTRO.size == 96 and INTRO2QEMU.size == 24 and ARCH_SIZE == 536


class KvmiError(Exception):
    def __init__(self, msg_id, err):
        super().__init__(f"message {msg_id}: error {err}")
        self.msg_id, self.err = msg_id, err


class V7Event:
    def __init__(self, seq, size, vcpu, event, arch, rest):
        self.seq, self.size, self.vcpu, self.event = seq, size, vcpu, event
        self.arch, self.rest = arch, rest

    @property
    def regs(self):
        return REGS.unpack_from(self.arch, 8)        # arch: u8 mode; u8; u16 view; u8[4]; regs

    @property
    def lstar(self):
        return struct.unpack_from("<Q", self.arch, 8 + 144 + 312 + 5 * 8)[0]

    @property
    def msr(self):
        return MSR_EV.unpack_from(self.rest)         # (msr, pad, old, new)


class Tool:
    """One introspected guest on an accepted connection (libkvmi's `dom`)."""

    _seq = itertools.count(1)

    def __init__(self, conn: socket.socket):
        self.sock = conn
        self.events: deque[V7Event] = deque()
        self.handshake: tuple | None = None

    # -- framing --
    def _read(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"EOF after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    def read_message(self):
        mid, size, seq = HDR.unpack(self._read(HDR.size))
        return mid, seq, self._read(size)

    def _push_event(self, seq, body):
        size, vcpu, event = EVENT_COMMON.unpack_from(body)
        assert EVENT_COMMON.size <= size <= len(body), (size, len(body))
        self.events.append(V7Event(seq, size, vcpu, event, body[EVENT_COMMON.size:size],
                                   body[size:]))

    def send(self, mid, payload=b"", seq=None):
        seq = next(self._seq) if seq is None else seq
        self.sock.sendall(HDR.pack(mid, len(payload), seq) + payload)
        return seq

    def wait_reply(self, mid, seq):
        """recv_reply(): events arriving first are queued; anything else is an error."""
        while True:
            rid, rseq, body = self.read_message()
            if rid == EVENT:
                self._push_event(rseq, body)
                continue
            assert (rid, rseq) == (mid, seq), f"reply {rid}/{rseq}, expected {mid}/{seq}"
            err, pad = ERRC.unpack_from(body)
            assert pad == 0
            if err:
                raise KvmiError(mid, err)
            return body[ERRC.size:]

    def request(self, mid, payload=b""):
        return self.wait_reply(mid, self.send(mid, payload))

    def error_of(self, mid, payload=b""):
        try:
            self.request(mid, payload)
        except KvmiError as e:
            return e.err
        return 0

    # -- handshake (src/kvmi.c handshake_done) --
    def do_handshake(self, cookie=bytes(20)):
        size = struct.unpack("<I", self._read(4))[0]
        rest = self._read(size - 4)
        self.handshake = QEMU2INTRO.unpack((struct.pack("<I", size) + rest)[:QEMU2INTRO.size])
        self.sock.sendall(INTRO2QEMU.pack(INTRO2QEMU.size, cookie))
        return self.handshake

    # -- commands --
    def get_version(self):
        version, pad, features = struct.unpack("<II8s", self.request(GET_VERSION))
        return version, pad, features

    def check_command(self, mid):
        return self.error_of(CHECK_COMMAND, struct.pack("<HHI", mid, 0, 0))

    def check_event(self, eid):
        return self.error_of(CHECK_EVENT, struct.pack("<HHI", eid, 0, 0))

    def vcpu_count(self):
        return struct.unpack_from("<I", self.request(GET_GUEST_INFO))[0]

    def tsc_speed(self, vcpu=0):
        return struct.unpack("<Q", self.request(GET_VCPU_INFO, VCPU_HDR.pack(vcpu, 0, 0)))[0]

    def control_events(self, vcpu, eid, enable=True):
        return self.request(CONTROL_EVENTS, VCPU_HDR.pack(vcpu, 0, 0)
                            + struct.pack("<HBBI", eid, int(enable), 0, 0))

    def control_msr(self, vcpu, msr, enable=True):
        return self.request(CONTROL_MSR, VCPU_HDR.pack(vcpu, 0, 0)
                            + struct.pack("<BBHI", int(enable), 0, 0, msr))

    def read_physical(self, gpa, size):
        return self.request(READ_PHYSICAL, struct.pack("<QQ", gpa, size))

    def write_physical(self, gpa, data):
        return self.request(WRITE_PHYSICAL, struct.pack("<QQ", gpa, len(data)) + data)

    def get_registers(self, vcpu, msrs=()):
        body = self.request(GET_REGISTERS, VCPU_HDR.pack(vcpu, 0, 0)
                            + struct.pack("<HHI", len(msrs), 0, 0)
                            + struct.pack(f"<{len(msrs)}I", *msrs))
        mode = struct.unpack_from("<I", body)[0]
        regs = REGS.unpack_from(body, 8)
        n = struct.unpack_from("<I", body, 8 + 144 + 312)[0]
        entries = [struct.unpack_from("<IIQ", body, 8 + 144 + 312 + 8 + 16 * i) for i in range(n)]
        return mode, regs, [(i, v) for i, _, v in entries]

    def get_cpuid(self, vcpu, function, index=0):
        return struct.unpack("<4I", self.request(GET_CPUID, VCPU_HDR.pack(vcpu, 0, 0)
                                                 + struct.pack("<II", function, index)))

    def max_gfn(self):
        return struct.unpack("<Q", self.request(GET_MAX_GFN))[0]

    def pause_all_vcpus(self, count):
        """kvmi_pause_all_vcpus: one write holding CONTROL_CMD_RESPONSE(enable=0, now=1), a
        PAUSE_VCPU(wait=1) per vCPU, CONTROL_CMD_RESPONSE(enable=1, now=1); only the last
        message is answered."""
        prefix = HDR.pack(CONTROL_CMD_RESPONSE, 8, next(self._seq)) + struct.pack("<BBHI", 0, 1, 0, 0)
        msgs = [HDR.pack(PAUSE_VCPU, 16, next(self._seq)) + VCPU_HDR.pack(v, 0, 0)
                + struct.pack("<BBHI", 1, 0, 0, 0) for v in range(count)]
        seq = next(self._seq)
        suffix = HDR.pack(CONTROL_CMD_RESPONSE, 8, seq) + struct.pack("<BBHI", 1, 1, 0, 0)
        self.sock.sendall(prefix + b"".join(msgs) + suffix)
        return self.wait_reply(CONTROL_CMD_RESPONSE, seq)

    # -- events --
    def next_event(self):
        if self.events:
            return self.events.popleft()
        mid, seq, body = self.read_message()
        assert mid == EVENT, f"message {mid} while waiting for an event"
        self._push_event(seq, body)
        return self.events.popleft()

    def reply(self, ev, action=CONTINUE, data=b""):
        """kvmi_reply_event: message 0, vcpu hdr + kvmi_event_reply + the event's reply."""
        self.send(EVENT_REPLY, VCPU_HDR.pack(ev.vcpu, 0, 0) + EV_REPLY.pack(action, ev.event, 0, 0)
                  + data, seq=ev.seq)

    def reply_msr(self, ev, value):
        self.reply(ev, CONTINUE, struct.pack("<Q", value))


def listen_unix(path: str) -> socket.socket:
    """kvmi_init_unix_socket: unlink, bind, listen."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)
    return s
