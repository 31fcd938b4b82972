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


# ---- refusals and the Reader's one-message fast path, with their exact messages ------------

def test_size_limit_messages_name_the_message_and_both_sizes():
    with pytest.raises(p.ProtocolError, match=r"^GET_VERSION: 8185 bytes > 8184$"):
        p.pack_message(2, 1, bytes(8185))
    # a vCPU event: 8 + 8 header bytes, the 536-byte state, the payload; 8184 in all is the most
    assert len(p.pack_vcpu_event(1, 15, 0, STATE, bytes(8184 - 16 - 536))) == 8 + 8184
    with pytest.raises(p.ProtocolError, match=r"^VCPU_EVENT: 8185 bytes > 8184$"):
        p.pack_vcpu_event(1, 15, 0, STATE, bytes(8185 - 16 - 536))
    with pytest.raises(ValueError, match=r"^vCPU state must be 536 bytes, not 5$"):
        p.state_bytes(b"short")


def test_a_reply_without_data_is_header_and_error_code_only():
    assert p.pack_reply(2, 7, 0) == struct.pack("<HHI", 2, 8, 7) + struct.pack("<iI", 0, 0)
    assert p.pack_reply(2, 7, -22, b"dropped") == struct.pack("<HHIiI", 2, 8, 7, -22, 0)


def test_event_reply_padding_message_is_exact():
    raw = bytearray(16)
    raw[2] = 1
    with pytest.raises(p.ProtocolError, match=r"^non-zero padding in an event reply$"):
        p.parse_event_reply(bytes(raw))


def vcpu_event(size: int, tail: bytes = b"") -> p.Message:
    """A vCPU event message whose vCPU header says `size` (544 for a whole state block)."""
    return p.Message(1, 4, struct.pack("<HHHH", 15, 0, 0, 0) + struct.pack("<HHI", size, 2, 0) + tail)


def test_vcpu_event_size_field_bounds():
    # the header alone (size 8: no state block) is an event whose state reads as zeros
    ev = p.parse_event(vcpu_event(8))
    assert (ev.seq, ev.event, ev.vcpu, ev.payload) == (4, 15, 2, b"")
    assert ev.state == p.VcpuState(0, bytes(144), bytes(312), (0,) * 9)
    for size in (0, 7):                          # smaller than its own header
        with pytest.raises(p.ProtocolError, match=rf"^vCPU event size {size}$"):
            p.parse_event(vcpu_event(size, bytes(600)))
    with pytest.raises(p.ProtocolError, match=r"^vCPU event size 544$"):   # past the message
        p.parse_event(vcpu_event(544, bytes(535)))
    ev = p.parse_event(vcpu_event(544, STATE + b"pay"))
    assert (ev.state.mode, ev.state.regs, ev.state.sregs) == (STATE[0], STATE[8:152], STATE[152:464])
    assert ev.state.msrs == struct.unpack("<9Q", STATE[464:536]) and ev.payload == b"pay"


def test_reader_take_one_whole_message_or_pieces():
    msg = struct.pack("<HHI", 4, 3, 9) + b"abc"
    assert p.Reader().take(msg) == p.Message(4, 9, b"abc")
    r = p.Reader()                                        # fewer bytes than a header
    assert r.take(msg[:3]) is None and r.pending() == 3
    assert r.take(msg[3:]) == p.Message(4, 9, b"abc") and r.pending() == 0
    empty = struct.pack("<HHI", 6, 0, 1)                  # exactly a header
    assert p.Reader().take(empty) == p.Message(6, 1, b"")


def test_reader_take_two_messages_at_once():
    a, b = struct.pack("<HHI", 4, 1, 1) + b"x", struct.pack("<HHI", 6, 2, 2) + b"yz"
    r = p.Reader()
    assert r.take(a + b) == p.Message(4, 1, b"x")
    assert r.pending() == len(b) and r.next() == p.Message(6, 2, b"yz")


def test_reader_take_completes_the_buffered_message_not_the_new_bytes():
    """The bytes after a buffered header are the rest of that message, even when they would
    also read as a whole message on their own."""
    inner = struct.pack("<HHI", 5, 2, 77) + b"hi"
    outer = struct.pack("<HHI", 4, len(inner), 1) + inner
    r = p.Reader()
    assert r.take(outer[:8]) is None
    assert r.take(outer[8:]) == p.Message(4, 1, inner) and r.pending() == 0


def test_reader_take_refuses_an_oversized_message_even_when_whole():
    r = p.Reader(max_size=16)
    with pytest.raises(p.ProtocolError, match=r"^VM_CHECK_COMMAND: size 17 > 16$"):
        r.take(struct.pack("<HHI", 4, 17, 1) + bytes(17))
    assert p.Reader(max_size=16).take(struct.pack("<HHI", 4, 16, 1) + bytes(16)) == \
        p.Message(4, 1, bytes(16))


def test_reader_eof_inside_a_message_says_how_many_bytes():
    r = p.Reader()
    r.feed(struct.pack("<HHI", 4, 10, 1) + b"abc")
    r.feed_eof()
    with pytest.raises(p.ProtocolError, match=r"^EOF inside a message \(11 bytes\)$"):
        r.read()
