"""Fuzz the introspection decoder, both ABIs: arbitrary bytes and structured mutations go
through the message Reader and `IntrospectionServer.process` (what the reader thread does with
each message), on a server over an in-memory backend.

The only allowed outcomes are success (a reply whose framing and error code are valid, or no
reply while kvmi-v7 replies are off) or the project's own ProtocolError (the connection would
close).  Any other exception, a handler error caught by the server's safety net, or a reply
that is not a well-formed answer to the message fails.  Fixed seed and a small budget in CI;
KVMGATE_SLOW=1 runs 50,000 byte strings and 10,000 streams of up to 8 structured messages per
ABI (at least 50,000 inputs of each kind per ABI).  Counts go to the summary.
"""
import os
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmgate.introspection.abi import V7, V12
from kvmgate.introspection.permissions import Permissions
from kvmgate.introspection.protocol import MAX_MSG_SIZE, ProtocolError, Reader
from kvmgate.introspection.server import IntrospectionServer

from ..introspection_fake import FakeBackend

SLOW = os.environ.get("KVMGATE_SLOW") == "1"
EXAMPLES = 50000 if SLOW else 300          # byte strings per ABI
STREAMS = 10000 if SLOW else 100           # structured streams per ABI, up to 8 messages each
HDR = struct.Struct("<HHI")                 # {u16 id; u16 size; u32 seq}
ERRC = struct.Struct("<iI")                 # {s32 err; u32 padding}
KVM_ERRORS = {0, -1, -2, -7, -11, -12, -14, -16, -22, -95, -1000}
ABIS = {"v12": V12, "v7": V7}
STATS = {name: {"inputs": 0, "messages": 0, "replies": 0, "closed": 0, "escapes": 0}
         for name in ABIS}
SUMMARY_LINES: list[str] = []
# Slow mode is long on a busy machine: its own per-test time limit (pytest-timeout).
pytestmark = pytest.mark.timeout(3600 if SLOW else 300)
SETTINGS = dict(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    parts = [f"{n}: {s['inputs']} inputs, {s['messages']} messages, {s['replies']} replies, "
             f"{s['closed']} closing errors, {s['escapes']} escapes" for n, s in STATS.items()]
    SUMMARY_LINES.append("introspection decoder fuzz: " + "; ".join(parts))


class Rig:
    """A server (not started: the test calls process()) whose replies are read back."""

    def __init__(self, abi):
        self.abi = abi
        a, self.peer = socket.socketpair()
        self.peer.setblocking(False)
        perms = Permissions()
        perms.allow_command(-1, 1)
        perms.allow_event(-1, 1)
        self.server = IntrospectionServer(a, FakeBackend(vcpus=2), perms, abi=abi)
        self.stats = STATS[abi.name]

    def drain(self) -> bytes:
        out = b""
        while True:
            try:
                chunk = self.peer.recv(1 << 20)
            except BlockingIOError:
                return out
            out += chunk

    def feed(self, data: bytes) -> None:
        """Decode `data` as a stream and process every message; check each answer."""
        self.stats["inputs"] += 1
        reader = Reader()
        reader.feed(data)
        reader.feed_eof()
        while True:
            try:
                msg = reader.read()
            except ProtocolError:
                self.stats["closed"] += 1
                return
            if msg is None:
                return
            self.stats["messages"] += 1
            try:
                self.server.process(msg)
            except ProtocolError:       # the connection would close; the next message is
                self.stats["closed"] += 1   # decoded anyway, as one more input
                self.drain()
                continue
            except Exception:
                self.stats["escapes"] += 1
                raise
            assert not self.server.handler_errors, self.server.handler_errors
            self.check_replies(msg, self.drain())

    def check_replies(self, msg, out: bytes) -> None:
        if not out:
            # no answer: only while kvmi-v7 replies are off (or an event reply was taken)
            assert self.abi is V7 or msg.id == self.abi.reply_id, msg
            return
        mid, size, seq = HDR.unpack_from(out)
        assert (mid, seq) == (msg.id, msg.seq) and len(out) == HDR.size + size
        err, pad = ERRC.unpack_from(out, HDR.size)
        assert pad == 0 and err in KVM_ERRORS
        assert err == 0 or size == ERRC.size
        self.stats["replies"] += 1


@pytest.fixture(scope="module", params=sorted(ABIS))
def rig(request):
    r = Rig(ABIS[request.param])
    yield r
    r.server.close("test over")
    r.peer.close()


def message(mid: int, payload: bytes, seq: int = 1) -> bytes:
    return HDR.pack(mid, len(payload), seq) + payload


# --- strategies ---------------------------------------------------------------------------

small = st.sampled_from([0, 0, 0, 1, 2, 0xFF, 0xFFFF, 0xFFFFFFFF])


@st.composite
def structured(draw, abi):
    """A message for one of the ABI's ids (or the reply id, or any id) with a payload built
    from the route's layout, then mutated (cut, extended, a byte changed)."""
    ids = sorted(abi.routes) + [abi.reply_id]
    mid = draw(st.sampled_from(ids)) if draw(st.integers(0, 9)) else draw(st.integers(0, 0xFFFF))
    route = abi.route(mid)
    size = (8 if route is None or route.vcpu else 0) + (route.size if route else 16)
    body = bytearray(size)                     # zeros, then a few fields set
    for _ in range(draw(st.integers(0, 3))):
        if size >= 4:
            off = draw(st.integers(0, size - 4)) & ~3
            body[off:off + 4] = struct.pack("<I", draw(small))
    payload = bytes(body)
    if route is not None and route.vcpu:
        payload = struct.pack("<HHI", draw(st.sampled_from([0, 1, 2, 0xFFFF])),
                              draw(st.sampled_from([0, 0, 1])), 0) + payload[8:]
    how = draw(st.integers(0, 9))      # 0, 5-9: as built
    if how == 1 and payload:
        payload = payload[:draw(st.integers(0, len(payload) - 1))]
    elif how == 2:
        payload += draw(st.binary(max_size=64))
    elif how == 3 and payload:
        i = draw(st.integers(0, len(payload) - 1))
        payload = payload[:i] + bytes([draw(st.integers(0, 255))]) + payload[i + 1:]
    elif how == 4:
        payload += bytes(draw(st.integers(0, 4200)))          # write data, msrs[] tails
    return message(mid, payload, draw(st.integers(0, 2**32 - 1)))


def streams(abi):
    return st.lists(structured(abi), min_size=1, max_size=8).map(b"".join)


# --- tests --------------------------------------------------------------------------------

@settings(**SETTINGS)
@given(data=st.binary(max_size=256))
def test_arbitrary_bytes(rig, data):
    rig.feed(data)


@settings(**dict(SETTINGS, max_examples=STREAMS))
@given(data=st.data())
def test_structured_mutations(rig, data):
    rig.feed(data.draw(streams(rig.abi)))


def test_oversized_header_closes(rig):
    before = rig.stats["closed"]
    rig.feed(HDR.pack(2, MAX_MSG_SIZE + 1, 1))
    assert rig.stats["closed"] == before + 1
