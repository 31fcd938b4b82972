"""Byte layouts of KVMI messages against docs/introspection.md §2-§3, written out with plain
struct here (not with the codecs' own Structs), and the codecs' refusals with their messages."""
import struct

import pytest

from kvmgate.introspection import protocol as p
from kvmgate.msr.model import READ, MsrRange, reason_name

STATE = bytes(range(256)) * 2 + bytes(24)          # any 536 bytes


def test_vm_event_layout():
    # header {id 0; size 8; seq}, then {u16 event; u16 pad[3]}
    assert p.pack_vm_event(7, 0) == struct.pack("<HHI", 0, 8, 7) + struct.pack("<HHHH", 0, 0, 0, 0)


def test_vcpu_event_layout_without_payload():
    got = p.pack_vcpu_event(9, 1, 3, STATE)
    want = (struct.pack("<HHI", 1, 8 + 8 + 536, 9) + struct.pack("<HHHH", 1, 0, 0, 0)
            + struct.pack("<HHI", 544, 3, 0) + STATE)
    assert got == want and len(got) == 560


def test_msr_event_layout():
    got = p.pack_vcpu_event(5, 15, 1, STATE, struct.pack("<IIQQ", 0xC0000082, 0, 0x1000, 0x2000))
    want = (struct.pack("<HHI", 1, 576, 5) + struct.pack("<HHHH", 15, 0, 0, 0)
            + struct.pack("<HHI", 544, 1, 0) + STATE + struct.pack("<IIQQ", 0xC0000082, 0, 0x1000, 0x2000))
    assert got == want and len(got) == 584


def test_event_reply_layout():
    assert p.pack_event_reply(4, 2, 0, 15) == \
        struct.pack("<HHI", 1, 16, 4) + struct.pack("<HHI", 2, 0, 0) + struct.pack("<BBHI", 0, 15, 0, 0)
    full = p.pack_event_reply(4, 0, 0, 15, struct.pack("<Q", 0x55))
    assert len(full) == 32 and full[-8:] == struct.pack("<Q", 0x55)


def test_event_reply_refusals():
    with pytest.raises(p.ProtocolError, match="event reply of 15 bytes"):
        p.parse_event_reply(bytes(15))
    for pad_at in (2, 4, 10, 12):                  # vcpu hdr pads, action hdr pads
        raw = bytearray(16)
        raw[pad_at] = 1
        with pytest.raises(p.ProtocolError, match="non-zero padding in an event reply"):
            p.parse_event_reply(bytes(raw))
    r = p.parse_event_reply(struct.pack("<HHIBBHI", 1, 0, 0, 2, 15, 0, 0) + b"xy")
    assert (r.vcpu, r.action, r.event, r.data) == (1, 2, 15, b"xy")


def test_event_refusals():
    with pytest.raises(p.ProtocolError, match="event of 7 bytes"):
        p.parse_event(p.Message(1, 0, bytes(7)))
    with pytest.raises(p.ProtocolError, match="GET_VERSION is not an event"):
        p.parse_event(p.Message(2, 0, bytes(8)))
    with pytest.raises(p.ProtocolError, match="vCPU event of 10 bytes"):
        p.parse_event(p.Message(1, 0, bytes(10)))
    ev = p.parse_event(p.Message(0, 3, struct.pack("<HHHH", 0, 0, 0, 0) + b"tail"))
    assert (ev.seq, ev.event, ev.vcpu, ev.state, ev.payload) == (3, 0, None, None, b"tail")


def test_get_registers_reply_layout_and_parse():
    regs, sregs = bytes(range(144)), bytes(312)
    got = p.pack_get_regs_reply(8, regs, sregs, [(0x10, 5), (0xC0000082, 0x1000)])
    want = (struct.pack("<II", 8, 0) + regs + sregs + struct.pack("<II", 2, 0)
            + struct.pack("<IIQ", 0x10, 0, 5) + struct.pack("<IIQ", 0xC0000082, 0, 0x1000))
    assert got == want
    back = p.parse_get_regs_reply(got)
    assert back.mode == 8 and back.msrs == [(0x10, 5), (0xC0000082, 0x1000)]
    assert back.regs.pack() == regs
    with pytest.raises(p.ProtocolError, match="truncated at MSR 1 of 2"):
        p.parse_get_regs_reply(got[:-1])
    for bad in ((bytes(143), sregs), (regs, bytes(311))):
        with pytest.raises(ValueError, match="regs/sregs must be 144/312 bytes"):
            p.pack_get_regs_reply(8, *bad, [])


def test_reason_names():
    assert [reason_name(r) for r in (1, 2, 4)] == ["INVAL", "UNKNOWN", "FILTER"]
    assert reason_name(0x80) == "reason(0x80)"
    assert reason_name("x") == "'x'" and reason_name(None) == "None"


def test_range_from_bits():
    assert MsrRange.from_bits(READ, 0x10, [True] * 8).bitmap == b"\xff"
    assert MsrRange.from_bits(READ, 0x10, [True, True, False]).bitmap == b"\x03"
    r = MsrRange.from_bits(READ, 0x10, [False] * 16 + [True])
    assert (r.nmsrs, r.bitmap) == (17, b"\x00\x00\x01")
    assert MsrRange.from_bits(READ, 0x10, [True, False, True, True]).bitmap == b"\x0d"
