"""`--introspect` specs and ABI choice (kvmgate.introspection.session), and QEMU's handshake
(connector.py) against a peer written from libkvmi's structs, over a socketpair."""
import hashlib
import socket
import struct
import threading

import pytest

from kvmgate.errors import UserError
from kvmgate.introspection.abi import V7, V12
from kvmgate.introspection.connector import HandshakeError, handshake
from kvmgate.introspection.session import Target, dialect_for, parse_spec

from .. import kvmi_v7_client as v7


@pytest.mark.parametrize("spec, target", [
    ("unix:/run/vm.sock", Target(False, "unix", "/run/vm.sock")),
    ("connect:unix:/tmp/t.sock", Target(True, "unix", "/tmp/t.sock")),
    ("connect:vsock:2:1234", Target(True, "vsock", (2, 1234))),
    ("connect:vsock:0x3:0x10", Target(True, "vsock", (3, 16))),
])
def test_parse_spec(spec, target):
    assert parse_spec(spec) == target


@pytest.mark.parametrize("spec", ["tcp:1", "unix:", "connect:", "connect:tcp:1",
                                  "connect:vsock:1", "connect:vsock:a:b", "connect:vsock:-1:2",
                                  "connect:vsock:1:4294967296", "connect:unix:" + "x" * 200,
                                  "connect:vsock:1:2:3", None])
def test_bad_specs_are_user_errors(spec):
    with pytest.raises(UserError) as ei:
        parse_spec(spec)
    assert "--introspect" in str(ei.value) or "introspection socket" in str(ei.value)


def test_default_abi_follows_the_role():
    assert dialect_for(None, parse_spec("connect:unix:/x")) is V7
    assert dialect_for(None, parse_spec("unix:/x")) is V12
    assert dialect_for("v12", parse_spec("connect:unix:/x")) is V12
    with pytest.raises(UserError):
        dialect_for("v9", parse_spec("unix:/x"))


def _peer(sock, answer, out):
    out["hello"] = sock.recv(96)
    sock.sendall(answer)
    sock.shutdown(socket.SHUT_WR)           # a short answer ends in EOF, not in a timeout


@pytest.mark.parametrize("answer, key, ok", [
    (v7.INTRO2QEMU.pack(24, bytes(20)), None, True),
    (v7.INTRO2QEMU.pack(40, bytes(20)) + b"x" * 16, None, True),      # a newer, longer answer
    (v7.INTRO2QEMU.pack(24, hashlib.sha1(b"k").digest()), b"k", True),
    (v7.INTRO2QEMU.pack(24, bytes(20)), b"k", False),                  # wrong cookie
    (struct.pack("<I", 23) + bytes(19), None, False),                  # too short
    (struct.pack("<I", 1 << 20), None, False),                         # too long
    (v7.INTRO2QEMU.pack(24, bytes(20))[:10], None, False),             # EOF inside
])
def test_handshake(answer, key, ok):
    a, b = socket.socketpair()
    out = {}
    t = threading.Thread(target=_peer, args=(b, answer, out), daemon=True)
    t.start()
    try:
        if ok:
            assert handshake(a, b"U" * 16, "vm-name", 1700000000, key, timeout=5) == answer[4:24]
        else:
            with pytest.raises(HandshakeError):
                handshake(a, b"U" * 16, "vm-name", 1700000000, key, timeout=5)
        t.join(5)
    finally:
        a.close()
        b.close()
    size, uuid, pad, start, name = v7.QEMU2INTRO.unpack(out["hello"])
    assert (size, uuid, pad, start) == (96, b"U" * 16, 0, 1700000000)
    assert name.rstrip(b"\0") == b"vm-name"
