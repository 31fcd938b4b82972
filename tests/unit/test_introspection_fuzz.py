"""Fuzz the server with random and mutated messages (docs/introspection.md §2-§3).

Asserts: no exception escapes the server, nothing hangs (every wait has a timeout), and no
permission bypass (a disallowed command never gets err 0, nor changes guest memory or MSR
interceptions).  Derandomized, modest counts by default; KVMGATE_SLOW=1 runs many more.
"""
import os
import random
import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmgate.introspection import ids
from kvmgate.introspection import protocol as p
from kvmgate.introspection.client import Client
from tests.introspection_fake import FakeBackend
from kvmgate.introspection.ids import CONTINUE, Action
from kvmgate.introspection import Introspection

SLOW = os.environ.get("KVMGATE_SLOW") == "1"
N_STREAMS = 3000 if SLOW else 250
N_REPLIES = 2000 if SLOW else 150
N_RAW = 2000 if SLOW else 150
TIMEOUT = 10.0
LSTAR = 0xC0000082
UUID = bytes(16)
STATE = p.pack_state(8, p.Regs(rip=0x1000), p.Sregs(cr3=0x2000))
KVM_CODES = {0} | {-c for c in ids.ERROR_NAMES}
TRIED = {"streams": 0, "messages": 0, "bytes": 0, "parsed": 0, "answers": 0, "denied": 0,
         "replies": 0}

SETTINGS = dict(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print(f"\nintrospection fuzz: {TRIED['messages']} messages tried in {TRIED['streams']} "
              f"streams ({TRIED['bytes']} bytes); the server parsed {TRIED['parsed']} and answered "
              f"{TRIED['answers']} ({TRIED['denied']} disallowed, none with err 0); "
              f"{TRIED['replies']} mutated event replies")


# --- strategies -------------------------------------------------------------------------------

pad16 = st.sampled_from([0, 0, 0, 0, 1, 0xFFFF])
pad32 = st.sampled_from([0, 0, 0, 0, 1, 0xFFFFFFFF])
flag = st.sampled_from([0, 1, 1, 2, 0xFF])
vcpu_idx = st.sampled_from([0, 1, 1, 2, 0xFFFF])
any_id = st.one_of(st.sampled_from(sorted(ids.COMMANDS | {0, 1})), st.integers(0, 0xFFFF))
msr_idx = st.sampled_from([0, 0x10, 0x176, 0x1FFF, 0x2000, LSTAR, 0xC0001FFF, 0xC0002000,
                           0xFFFFFFFF])
gpa = st.one_of(st.integers(0, 0x10FFF), st.sampled_from([0xFFF, 0xFFFF, 2**64 - 1]))


@st.composite
def payload_for(draw, mid):
    """A payload shaped like `mid`'s request, with fields and padding drawn at random."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=64))
    vhdr = p.VCPU_HDR.pack(draw(vcpu_idx), draw(pad16), draw(pad32))
    if mid in (ids.VM_CHECK_COMMAND, ids.VM_CHECK_EVENT):
        body = p.CHECK_REQ.pack(draw(any_id), draw(pad16), draw(pad32))
    elif mid == ids.VM_CONTROL_EVENTS:
        body = p.CONTROL_EVENTS_REQ.pack(draw(st.integers(0, 21)), draw(flag), draw(flag) & 1, draw(pad32))
    elif mid in (ids.VM_READ_PHYSICAL, ids.VM_WRITE_PHYSICAL):
        size = draw(st.sampled_from([0, 1, 8, 4096, 4097, 0xFFFF]) | st.integers(0, 64))
        body = p.READ_PHYS_REQ.pack(draw(gpa), size, draw(pad16), draw(pad32))
        if mid == ids.VM_WRITE_PHYSICAL:
            body += b"\xAA" * draw(st.sampled_from([size, size, max(size - 1, 0), size + 3]))
    elif mid == ids.VM_PAUSE_VCPU:
        body = p.PAUSE_REQ.pack(draw(vcpu_idx), draw(flag), draw(flag) & 1, draw(pad32))
    elif mid == ids.VCPU_CONTROL_EVENTS:
        body = vhdr + p.CONTROL_EVENTS_REQ.pack(draw(st.integers(0, 21)), draw(flag), 0, draw(pad32))
    elif mid == ids.VCPU_GET_REGISTERS:
        n = draw(st.sampled_from([0, 1, 2, 481, 482, 0xFFFF]) | st.integers(0, 8))
        sent = draw(st.sampled_from([n, n, max(n - 1, 0), n + 1]))
        body = vhdr + p.GET_REGS_REQ.pack(n, draw(pad16), draw(pad32)) + \
            b"".join(p.struct.pack("=I", draw(msr_idx)) for _ in range(min(sent, 8))) + \
            bytes(4 * max(sent - 8, 0))
    elif mid == ids.VCPU_SET_REGISTERS:
        body = vhdr + draw(st.binary(max_size=160))
    elif mid == ids.VCPU_CONTROL_MSR:
        body = vhdr + p.CONTROL_MSR_REQ.pack(draw(flag), draw(flag) & 1, draw(pad16), draw(msr_idx))
    elif mid == ids.MSG_VCPU_EVENT:      # an event reply nobody (or somebody) waits for
        body = vhdr + p.EVENT_REPLY.pack(draw(flag), draw(st.sampled_from([1, 15, 0])), draw(pad16),
                                         draw(pad32)) + draw(st.binary(max_size=12))
    elif mid & 1:
        body = vhdr + draw(st.binary(max_size=24))
    else:
        body = draw(st.binary(max_size=24))
    if draw(st.integers(0, 7)) == 0:    # shorter or longer than the struct
        body = body[:draw(st.integers(0, len(body)))] + draw(st.binary(max_size=8))
    return body


@st.composite
def message(draw):
    mid = draw(any_id)
    body = draw(payload_for(mid))[:0xFFFF]      # may exceed 8184: the server must close
    raw = bytearray(p.HEADER.pack(mid, len(body), draw(st.integers(0, 2**32 - 1))) + body)
    how = draw(st.integers(0, 39))     # most messages stay well-framed
    if how == 0:                         # the size field lies (possibly over the limit)
        p.struct.pack_into("=H", raw, 2, draw(st.sampled_from([0, 1, 8184, 8185, 0xFFFF])
                                              | st.integers(0, 64)))
    elif how in (1, 2) and raw:          # a flipped byte
        i = draw(st.integers(0, len(raw) - 1))
        raw[i] ^= draw(st.integers(1, 255))
    elif how == 3:                       # cut short
        raw = raw[:draw(st.integers(0, len(raw)))]
    return bytes(raw)


# --- one connection under fuzz ----------------------------------------------------------------

class Session:
    """A hooked VM whose tool has asked for LSTAR writes on vCPU 0, then restricted permissions."""

    def __init__(self, commands, events):
        self.backend = FakeBackend(vcpus=2)
        self.closes = []
        self.intro = Introspection(self.backend, on_close=self.closes.append)
        a, self.sock = socket.socketpair()
        self.intro.hook(a, UUID)
        a.close()
        self.sock.settimeout(TIMEOUT)
        self.server = self.intro.server
        self.intro.allow_command(-1, 1)
        self.intro.allow_event(-1, 1)
        c = Client(self.sock)
        c.vcpu_control_events(0, ids.VCPU_EVENT_MSR)
        c.control_msr(0, LSTAR)
        self.intro.allow_command(-1, 0)
        self.intro.allow_event(-1, 0)
        for cid in commands:
            self.intro.allow_command(cid, 1)
        for eid in events:
            self.intro.allow_event(eid, 1)
        self.allowed = self.intro.permissions.allowed_commands()
        self.setup_messages = self.server.messages
        self.received = bytearray()

    def drain(self):
        try:
            while data := self.sock.recv(65536):
                self.received += data
        except OSError:
            pass

    def vcpu_loop(self):
        """A vCPU thread: MSR writes and PAUSE handling until the tool is gone."""
        n = 0
        while self.intro.connected:
            n += 1
            action, value = self.intro.msr_event(0, LSTAR, n, n + 1, STATE)
            assert isinstance(action, Action) and 0 <= value < 2**64
            assert isinstance(self.intro.handle_pauses(1, STATE), Action)
            time.sleep(0.0005)

    def run(self, stream: bytes):
        drain = threading.Thread(target=self.drain, daemon=True)
        vcpu = threading.Thread(target=self.vcpu_loop, daemon=True)
        errors = []
        vcpu.run = _capture(vcpu.run, errors)
        drain.start()
        vcpu.start()
        try:
            self.sock.sendall(stream)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:                  # the server closed first: fine
            pass
        drain.join(TIMEOUT)
        assert not drain.is_alive(), "the server never closed the connection"
        assert self.server.join(TIMEOUT), "reader thread hangs"
        vcpu.join(TIMEOUT)
        assert not vcpu.is_alive(), "a vCPU thread hangs"
        assert not errors, errors
        TRIED["parsed"] += self.server.messages - self.setup_messages

    def check(self):
        assert not self.server.internal_errors, self.server.internal_errors
        assert not self.server.handler_errors, self.server.handler_errors
        r = p.Reader()
        r.feed(bytes(self.received))
        r.feed_eof()
        while (msg := r.read()) is not None:
            if msg.id in (ids.MSG_VM_EVENT, ids.MSG_VCPU_EVENT):
                continue                 # events (and replies to ids 0/1, all -KVM_ENOSYS)
            err, pad = p.fixed(p.ERR, msg.payload)
            assert pad == 0 and err in KVM_CODES
            TRIED["answers"] += 1
            if msg.id not in self.allowed:
                TRIED["denied"] += 1
                assert err != 0, f"permission bypass: {ids.command_name(msg.id)} answered 0"
            if msg.id not in self.server.implemented:
                assert err == -ids.KVM_ENOSYS
            if err:
                assert len(msg.payload) == p.ERR.size
        if ids.VM_WRITE_PHYSICAL not in self.allowed:
            assert not any(self.backend.mem), "guest memory written without permission"
        self.intro.unhook()
        assert self.backend.controlled == set(), "an interception survived the connection"
        self.sock.close()


def _capture(run, errors):
    def wrapped():
        try:
            run()
        except BaseException as exc:
            errors.append(exc)
    return wrapped


@settings(max_examples=N_STREAMS, **SETTINGS)
@given(st.lists(message(), min_size=1, max_size=40),
       st.one_of(st.just(ids.COMMANDS), st.sets(st.sampled_from(sorted(ids.COMMANDS)))),
       st.one_of(st.just(ids.EVENTS), st.sets(st.sampled_from(sorted(ids.EVENTS)))))
def test_fuzz_message_streams(msgs, commands, events):
    s = Session(commands, events)
    stream = b"".join(msgs)
    TRIED["streams"] += 1
    TRIED["messages"] += len(msgs)
    TRIED["bytes"] += len(stream)
    s.run(stream)
    s.check()


def test_fuzz_raw_bytes():
    """Seeded random byte streams, biased to plausible headers, written in random chunks."""
    rng = random.Random(0x6BF7A072)
    for _ in range(N_RAW):
        s = Session(rng.sample(sorted(ids.COMMANDS), rng.randint(0, 24)),
                    rng.sample(sorted(ids.EVENTS), rng.randint(0, 11)))
        parts = []
        for _ in range(rng.randint(0, 30)):
            mid = rng.choice([rng.randrange(0x10000), rng.choice(sorted(ids.COMMANDS))])
            size = rng.choice([rng.randrange(40)] * 12 + [rng.randrange(8185), 8184, 8185,
                                                           rng.randrange(0x10000)])
            body = rng.randbytes(size if rng.random() < 0.95 else rng.randrange(size + 1))
            parts.append(p.HEADER.pack(mid, size, rng.getrandbits(32)) + body)
        stream = b"".join(parts) + rng.randbytes(rng.randrange(16))
        TRIED["streams"] += 1
        TRIED["messages"] += len(parts)
        TRIED["bytes"] += len(stream)
        s.run(stream)
        s.check()


# --- replies to a real event ---------------------------------------------------------------------

def expected_msr_result(raw: bytes, seq: int, old: int = 1, new: int = 2):
    """Oracle for one reply to msr_event(0, LSTAR, old, new) followed by EOF, written from
    docs/introspection.md §2-§3 with plain struct (not the server's Reader or codecs).

    Only the first message can answer: anything that is not a complete, well-formed reply to
    this event closes the connection (or leaves the vCPU waiting until EOF), which releases the
    vCPU with the guest's value."""
    released = (CONTINUE, new)
    if len(raw) < 8:                                   # no complete header before EOF
        return released
    mid, size, mseq = struct.unpack_from("<HHI", raw)  # {u16 id; u16 size; u32 seq}
    if size > 8184 or len(raw) < 8 + size or mid != 1 or mseq != seq:
        return released
    body = raw[8:8 + size]
    if len(body) < 16:                                 # vCPU header + {action; event; pad}
        return released
    vcpu, pad1, pad2, action, event, pad3, pad4 = struct.unpack_from("<HHIBBHI", body)
    data = body[16:]
    if pad1 or pad2 or pad3 or pad4 or vcpu != 0 or event != 15 or action > 2 or len(data) > 8:
        return released
    if action == 0:                                    # CONTINUE: store the tool's u64
        return CONTINUE, int.from_bytes(data + bytes(8 - len(data)), "little")
    return Action(action), old                         # RETRY / CRASH keep the old value


@settings(max_examples=N_REPLIES, **SETTINGS)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 255)), max_size=3),
       st.sampled_from([None, 0, 8, 16, 20, 24, 33, 40]),
       st.sampled_from([None, 0, 8, 16, 24, 25, 8185]))
def test_fuzz_event_replies(flips, cut, size):
    """A vCPU waits in msr_event; the tool answers with a mutated reply: it returns, always."""
    s = Session(ids.COMMANDS, ids.EVENTS)
    c = Client(s.sock)
    vcpu_result = []
    vcpu = threading.Thread(target=lambda: vcpu_result.append(
        s.intro.msr_event(0, LSTAR, 1, 2, STATE)), daemon=True)
    vcpu.start()
    ev = c.next_event()
    good = p.pack_event_reply(ev.seq, 0, CONTINUE, ids.VCPU_EVENT_MSR, p.MSR_REPLY.pack(5))
    raw = bytearray(good)
    for pos, val in flips:
        if pos < len(raw):
            raw[pos] = val
    if cut is not None:
        raw = raw[:cut]
    if size is not None and len(raw) >= 4:
        p.struct.pack_into("=H", raw, 2, size)
    TRIED["replies"] += 1
    s.sock.sendall(bytes(raw))
    s.sock.shutdown(socket.SHUT_WR)      # then EOF: an incomplete reply cannot keep it waiting
    vcpu.join(TIMEOUT)
    assert not vcpu.is_alive(), "the vCPU hangs"
    assert vcpu_result[0] == expected_msr_result(bytes(raw), ev.seq)
    assert s.server.join(TIMEOUT)
    assert not s.server.internal_errors
    s.intro.unhook()
    assert s.backend.controlled == set()
    s.sock.close()
