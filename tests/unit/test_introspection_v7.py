"""The kvmi-v7 (libkvmi) dialect of the server over a socketpair with an in-memory backend,
driven by the tool written from libkvmi's headers (tests/kvmi_v7_client.py)."""
import socket
import struct

import pytest

from kvmgate.introspection import Introspection, ids
from kvmgate.introspection.abi import V7

from .. import kvmi_v7_client as v7
from ..introspection_fake import FakeBackend

T = 5.0


@pytest.fixture
def rig():
    backend = FakeBackend(vcpus=2)
    intro = Introspection(backend, obj="vm0")
    a, b = socket.socketpair()
    intro.hook(a, bytes(16), abi=V7, commands=[-1])
    a.close()
    b.settimeout(T)
    tool = v7.Tool(b)
    yield intro, tool, backend
    intro.unhook()
    b.close()


def closed(intro, tool):
    assert tool.sock.recv(64) == b""
    assert intro.server.join(T)
    return intro.server.close_reason


def test_replies_off_and_on(rig):
    intro, tool, _ = rig
    tool.send(v7.CONTROL_CMD_RESPONSE, struct.pack("<BBHI", 0, 1, 0, 0))   # off, now: no reply
    tool.send(v7.GET_VERSION)                                              # no reply
    tool.send(v7.PAUSE_VCPU, v7.VCPU_HDR.pack(0, 0, 0) + struct.pack("<BBHI", 1, 0, 0, 0))
    # the PAUSE event is disallowed: its -KVM_EPERM is sent even with replies off, and it is
    # the first message back (GET_VERSION got none)
    seq = tool.send(v7.CONTROL_CMD_RESPONSE, struct.pack("<BBHI", 1, 1, 0, 0))
    mid, rseq, body = tool.read_message()
    assert mid == v7.PAUSE_VCPU and struct.unpack_from("<i", body)[0] == -v7.KVM_EPERM
    assert tool.wait_reply(v7.CONTROL_CMD_RESPONSE, seq) == b""
    # now=0: this message is answered, the change applies after it
    assert tool.request(v7.CONTROL_CMD_RESPONSE, struct.pack("<BBHI", 0, 0, 0, 0)) == b""
    tool.send(v7.GET_GUEST_INFO)                                           # no reply
    seq = tool.send(v7.CONTROL_CMD_RESPONSE, struct.pack("<BBHI", 1, 1, 0, 0))
    assert tool.wait_reply(v7.CONTROL_CMD_RESPONSE, seq) == b""
    assert tool.vcpu_count() == 2


def test_batch_of_pauses_is_one_reply_and_pauses_are_queued(rig):
    intro, tool, backend = rig
    intro.allow_event(ids.VCPU_EVENT_PAUSE, 1)
    assert tool.pause_all_vcpus(2) == b""
    assert backend.pause_calls == [(0, True), (1, True)]
    assert intro.pending_pauses(0) == intro.pending_pauses(1) == 1


def test_layouts_that_differ_from_v12(rig):
    intro, tool, backend = rig
    backend.mem[0x1FF0:0x1FF5] = b"hello"
    assert tool.read_physical(0x1FF0, 5) == b"hello"                     # {u64 gpa; u64 size}
    assert tool.error_of(v7.READ_PHYSICAL, struct.pack("<QQ", 0, 4097)) == -v7.KVM_EINVAL
    assert tool.error_of(v7.READ_PHYSICAL, struct.pack("<QQ", 0, 2**40)) == -v7.KVM_EINVAL
    tool.write_physical(0x10, b"abc")
    assert backend.mem[0x10:0x13] == b"abc"
    assert tool.max_gfn() == (len(backend.mem) - 1) >> 12
    assert tool.get_cpuid(1, 0) == backend.cpuid[(0, 0)]
    assert tool.error_of(v7.CONTROL_CR, v7.VCPU_HDR.pack(0, 0, 0) + bytes(8)) == \
        -v7.KVM_EOPNOTSUPP
    assert tool.check_command(v7.CONTROL_CR) == -v7.KVM_ENOENT
    assert tool.get_version() == (1, 0, bytes(8))                         # still in step


@pytest.mark.parametrize("mid, payload", [
    (30, b""),                                     # a gap in the kvmi-v7 table
    (1, bytes(8)),                                 # KVMI_EVENT is not for tools to send
    (v7.EVENT_REPLY, bytes(16)),                   # a reply nobody waits for
    (v7.READ_PHYSICAL, bytes(15)),                 # short request
    (v7.PAUSE_VCPU, bytes(12)),                    # short: vcpu hdr + half a request
    (v7.WRITE_PHYSICAL, struct.pack("<QQ", 0, 8) + b"abc"),   # data shorter than size
])
def test_what_closes_the_connection(rig, mid, payload):
    intro, tool, _ = rig
    tool.send(mid, payload)
    assert "protocol error" in closed(intro, tool)
