"""docs/introspection.md §2-§3: wire sizes, ids, codecs and the streaming Reader (pure)."""
import socket
import struct

import pytest

from kvmgate.introspection import ids
from kvmgate.introspection import protocol as p
from kvmgate.introspection.abi import V7, V12


def test_sizes():
    assert p.HEADER.size == 8
    assert p.ERR.size == 8
    assert p.VCPU_HDR.size == 8
    assert p.REGS.size == p.REGS_SIZE == 144
    assert p.SREGS.size == p.SREGS_SIZE == 312
    assert p.STATE.size == p.STATE_SIZE == 536
    assert p.VCPU_EVENT_SIZE == 544
    assert p.VERSION_RPL.size == 16 and p.GET_INFO_RPL.size == 16
    assert p.MAX_MSG_SIZE == 8184
    assert p.MAX_GET_REGS_MSRS == 481


def test_msr_event_message_is_584_bytes_and_reply_32():
    """v12, laid out by hand from docs/introspection.md (not with the codec's structs)."""
    state = p.pack_state(8, p.Regs(rip=0x1000), p.Sregs(cr3=0x2000), range(9))
    msg = V12.pack_vcpu_event(5, ids.VCPU_EVENT_MSR, 1, state,
                              struct.pack("=IIQQ", 0xC0000082, 0, 1, 2))
    assert len(msg) == 584
    assert msg[:24] == struct.pack("=HHI", 1, 576, 5) + struct.pack("=HHHH", 15, 0, 0, 0) \
        + struct.pack("=HHI", 544, 1, 0)
    assert msg[24:560] == state and struct.unpack_from("=IIQQ", msg, 560) == (0xC0000082, 0, 1, 2)
    reply = p.pack_event_reply(5, 1, ids.CONTINUE, ids.VCPU_EVENT_MSR, p.MSR_REPLY.pack(3))
    assert len(reply) == 32


def test_v7_msr_event_message_is_576_bytes():
    """kvmi-v7: message 1, struct kvmi_event {u16 size=544; u16 vcpu; u8 event=2; u8 pad[3];
    arch}, then struct kvmi_event_msr; no separate event header."""
    state = p.pack_state(8, p.Regs(rip=0x1000), p.Sregs(cr3=0x2000), range(9))
    msg = V7.pack_vcpu_event(5, ids.VCPU_EVENT_MSR, 1, state,
                             struct.pack("=IIQQ", 0xC0000082, 0, 1, 2))
    assert len(msg) == 576
    assert msg[:16] == struct.pack("=HHI", 1, 568, 5) + struct.pack("=HHB3x", 544, 1, 2)
    assert msg[16:552] == state
    assert struct.unpack_from("=Q", msg, 16 + 464 + 5 * 8)[0] == 5       # arch.msrs.lstar
    assert struct.unpack_from("=IIQQ", msg, 552) == (0xC0000082, 0, 1, 2)
    unhook = V7.pack_vm_event(6, ids.VM_EVENT_UNHOOK)
    assert unhook[:16] == struct.pack("=HHI", 1, 544, 6) + struct.pack("=HHB3x", 544, 0, 0)
    assert len(unhook) == 552


def test_v7_ids_by_meaning():
    assert V7.route(11).perm == ids.VCPU_CONTROL_MSR and V7.route(5).perm == ids.VM_GET_INFO
    assert V7.route(27).perm is None                  # CONTROL_CMD_RESPONSE: framing only
    assert V7.event_wire(ids.VCPU_EVENT_MSR) == 2 and V7.event_wire(ids.VCPU_EVENT_PAUSE) == 10
    assert V7.event_meaning[1] == ids.VCPU_EVENT_CR and 0 not in V7.routes and 1 not in V7.routes
    assert V7.reply_id == 0 and V12.reply_id == 1
    assert V7.version_reply() == struct.pack("=II8s", 1, 0, bytes(8))
    assert V12.version_reply() == struct.pack("=II8s", 1, 8184, bytes(8))
    for v12_id, route in V12.routes.items():
        assert route.perm == v12_id and route.vcpu == bool(v12_id & 1)


def test_host_byte_order_header():
    assert p.pack_message(ids.GET_VERSION, 7) == struct.pack("=HHI", 2, 0, 7)
    assert p.pack_message(0x1234, 0xDEADBEEF, b"ab")[:8] == struct.pack("=HHI", 0x1234, 2, 0xDEADBEEF)


def test_message_ids():
    assert ids.VM(3) == 6 and ids.VCPU(3) == 7
    table = {"GET_VERSION": 2, "VM_CHECK_COMMAND": 4, "VM_CHECK_EVENT": 6, "VM_GET_INFO": 8,
             "VM_CONTROL_EVENTS": 10, "VM_READ_PHYSICAL": 12, "VM_WRITE_PHYSICAL": 14,
             "VM_PAUSE_VCPU": 16, "VM_CONTROL_CLEANUP": 18, "VM_SET_PAGE_ACCESS": 20,
             "VCPU_GET_INFO": 3, "VCPU_CONTROL_EVENTS": 5, "VCPU_GET_REGISTERS": 7,
             "VCPU_SET_REGISTERS": 9, "VCPU_GET_CPUID": 11, "VCPU_CONTROL_CR": 13,
             "VCPU_INJECT_EXCEPTION": 15, "VCPU_GET_XCR": 17, "VCPU_GET_XSAVE": 19,
             "VCPU_SET_XSAVE": 21, "VCPU_GET_MTRR_TYPE": 23, "VCPU_CONTROL_MSR": 25,
             "VCPU_CONTROL_SINGLESTEP": 27, "VCPU_TRANSLATE_GVA": 29}
    for name, value in table.items():
        assert getattr(ids, name) == value
        assert ids.command_name(value) == name
    events = {"VM_EVENT_UNHOOK": 0, "VCPU_EVENT_PAUSE": 1, "VCPU_EVENT_HYPERCALL": 3,
              "VCPU_EVENT_BREAKPOINT": 5, "VCPU_EVENT_CR": 7, "VCPU_EVENT_TRAP": 9,
              "VCPU_EVENT_XSETBV": 11, "VCPU_EVENT_DESCRIPTOR": 13, "VCPU_EVENT_MSR": 15,
              "VCPU_EVENT_PF": 17, "VCPU_EVENT_SINGLESTEP": 19}
    for name, value in events.items():
        assert getattr(ids, name) == value
    assert (ids.CONTINUE, ids.RETRY, ids.CRASH) == (0, 1, 2)
    codes = {"KVM_EPERM": 1, "KVM_ENOENT": 2, "KVM_EAGAIN": 11, "KVM_ENOMEM": 12,
             "KVM_EFAULT": 14, "KVM_EBUSY": 16, "KVM_EINVAL": 22, "KVM_E2BIG": 7,
             "KVM_EOPNOTSUPP": 95, "KVM_ENOSYS": 1000}
    for name, value in codes.items():
        assert getattr(ids, name) == value
        assert ids.error_name(-value) == ids.error_name(value) == name


@pytest.mark.parametrize("value", [1234, -1, 2**40, None, "x", 3.5])
def test_names_never_raise(value):
    assert ids.command_name(1234) == "command(1234)"
    for fn in (ids.command_name, ids.event_name, ids.error_name, ids.action_name, ids.message_name):
        assert isinstance(fn(value), str)
    assert ids.event_name(99) == "event(99)"
    assert ids.error_name(0) == "OK"
    assert ids.action_name(7) == "action(7)"
    assert ids.message_name(1) == "VCPU_EVENT" and ids.message_name(0) == "VM_EVENT"


def test_regs_round_trip():
    r = p.Regs(*range(1, 19))
    raw = r.pack()
    assert len(raw) == 144 and p.Regs.unpack(raw) == r
    assert struct.unpack("=18Q", raw)[16] == r.rip == 17 and r.rflags == 18
    assert p.Regs.unpack(b"\x01") == p.Regs(rax=1)       # short: zero-filled


def test_sregs_round_trip_and_layout():
    s = p.Sregs(cs=p.Segment(base=0x10, limit=0xFFFFF, selector=8, type=11, present=1, l=1, g=1),
                tr=p.Segment(selector=0x28, unusable=1), gdt=p.Dtable(0x5000, 0x37),
                idt=p.Dtable(0x6000, 0xFFF), cr0=0x80050033, cr3=0x1000, cr4=0x20, efer=0xD01,
                apic_base=0xFEE00900, interrupt_bitmap=(1, 2, 3, 4))
    raw = s.pack()
    assert len(raw) == 312 and p.Sregs.unpack(raw) == s
    # kvm_sregs offsets: gdt @192, cr0 @224, cr3 @240, efer @264, apic_base @272, bitmap @280
    assert struct.unpack_from("=QH", raw, 192) == (0x5000, 0x37)
    assert struct.unpack_from("=Q", raw, 224)[0] == 0x80050033
    assert struct.unpack_from("=Q", raw, 240)[0] == 0x1000
    assert struct.unpack_from("=Q", raw, 264)[0] == 0xD01
    assert struct.unpack_from("=4Q", raw, 280) == (1, 2, 3, 4)
    assert struct.unpack_from("=H", raw, 6 * 24 + 12)[0] == 0x28   # tr.selector


def test_state_round_trip():
    regs, sregs = p.Regs(rip=0xFFFF0).pack(), p.Sregs(efer=0x500).pack()
    msrs = tuple(range(100, 109))
    raw = p.pack_state(4, regs, sregs, msrs)
    assert len(raw) == 536 and raw[1:8] == bytes(7)
    st = p.VcpuState.unpack(raw)
    assert st == p.VcpuState(4, regs, sregs, msrs)
    assert st.pack() == raw
    assert st.msr("lstar") == 105 and st.msr("sysenter_eip") == 102
    assert p.state_bytes(lambda: st) == raw and p.state_bytes(None) == bytes(536)
    with pytest.raises(ValueError):
        p.state_bytes(b"short")


def test_event_parse_round_trip():
    state = p.pack_state(8, p.Regs(rax=7), p.Sregs(), (0,) * 5 + (0xFFFF8000,) + (0,) * 3)
    raw = p.pack_vcpu_event(9, ids.VCPU_EVENT_MSR, 3, state, p.MSR_EVENT.pack(0xC0000082, 0, 0x10, 0x20))
    r = p.Reader()
    r.feed(raw)
    msg = r.read()
    ev = p.parse_event(msg)
    assert (ev.seq, ev.event, ev.vcpu) == (9, ids.VCPU_EVENT_MSR, 3)
    assert ev.state.mode == 8 and p.Regs.unpack(ev.state.regs).rax == 7
    assert ev.state.msr("lstar") == 0xFFFF8000
    assert p.parse_msr_event(ev.payload) == (0xC0000082, 0x10, 0x20)
    rr = p.Reader()
    rr.feed(p.pack_vm_event(4, ids.VM_EVENT_UNHOOK))
    vm = p.parse_event(rr.read())
    assert (vm.seq, vm.event, vm.vcpu, vm.state) == (4, ids.VM_EVENT_UNHOOK, None, None)
    assert len(p.pack_vm_event(4, 0)) == 16


def test_event_reply_parse_is_strict_about_padding():
    raw = p.pack_event_reply(1, 2, ids.CRASH, ids.VCPU_EVENT_MSR, p.MSR_REPLY.pack(5))
    r = p.parse_event_reply(raw[8:])
    assert r == p.EventReply(2, ids.CRASH, ids.VCPU_EVENT_MSR, p.MSR_REPLY.pack(5))
    for off in (10, 11, 12, 15, 18, 19, 20, 23):       # padding bytes of vcpu hdr / reply
        bad = bytearray(raw[8:])
        bad[off - 8] = 1
        with pytest.raises(p.ProtocolError):
            p.parse_event_reply(bytes(bad))
    with pytest.raises(p.ProtocolError):
        p.parse_event_reply(raw[8:20])


def test_get_registers_round_trip():
    req = p.pack_get_regs_request([0x10, 0xC0000080])
    assert len(req) == 8 + 8 and p.GET_REGS_REQ.unpack_from(req) == (2, 0, 0)
    regs, sregs = p.Regs(rsp=0x7000).pack(), p.Sregs(cr0=1).pack()
    data = p.pack_get_regs_reply(8, regs, sregs, [(0x10, 99), (0xC0000080, 0xD01)])
    assert len(data) == 8 + 144 + 312 + 8 + 2 * 16
    back = p.parse_get_regs_reply(data)
    assert back.mode == 8 and back.regs.rsp == 0x7000 and back.sregs.cr0 == 1
    assert back.msrs == [(0x10, 99), (0xC0000080, 0xD01)] and back.raw_sregs == sregs


def test_fixed_zero_fills_and_ignores_extra():
    assert p.fixed(p.READ_PHYS_REQ, b"\x01") == (1, 0, 0, 0)
    assert p.fixed(p.CHECK_REQ, struct.pack("=HHI", 8, 0, 0) + b"extra") == (8, 0, 0)
    assert p.fixed(p.CHECK_REQ, b"") == (0, 0, 0)
    assert p.fixed(p.MSR_EVENT, bytes(40), 30) == (0, 0, 0, 0)


def test_msr_valid():
    for good in (0, 0x1FFF, 0x174, 0xC0000000, 0xC0000082, 0xC0001FFF):
        assert p.msr_valid(good)
    for bad in (0x2000, 0xBFFFFFFF, 0xC0002000, 0x40000000, 0xFFFFFFFF, -1):
        assert not p.msr_valid(bad)


def test_reader_reassembles_byte_by_byte():
    stream = b"".join(p.pack_message(ids.VM_READ_PHYSICAL, i, bytes([i]) * i) for i in range(20))
    r = p.Reader()
    out = []
    for byte in stream:
        r.feed(bytes([byte]))
        while (m := r.read()) is not None:
            out.append(m)
    assert [(m.id, m.seq, m.payload) for m in out] == \
        [(ids.VM_READ_PHYSICAL, i, bytes([i]) * i) for i in range(20)]
    assert r.pending() == 0


def test_reader_size_limit():
    r = p.Reader()
    r.feed(p.HEADER.pack(2, 8184, 1) + bytes(8184))
    assert len(r.read().payload) == 8184
    r.feed(p.HEADER.pack(2, 8185, 1))
    with pytest.raises(p.ProtocolError):
        r.read()
    with pytest.raises(p.ProtocolError):
        p.pack_message(2, 1, bytes(8185))


def test_reader_on_a_socket():
    a, b = socket.socketpair()
    try:
        a.sendall(p.pack_message(4, 1, b"abc") + p.pack_message(6, 2))
        a.sendall(p.pack_message(8, 3, b"x" * 5000)[:100])
        r = p.Reader(b)
        assert r.read() == p.Message(4, 1, b"abc")
        assert r.read() == p.Message(6, 2, b"")
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(p.ProtocolError):      # EOF inside a message
            r.read()
        a2, b2 = socket.socketpair()
        a2.sendall(p.pack_message(2, 9))
        a2.close()
        r2 = p.Reader(b2)
        assert r2.read() == p.Message(2, 9, b"")
        assert r2.read() is None                   # clean EOF on a boundary
        b2.close()
    finally:
        a.close()
        b.close()


def test_reply_carries_data_only_on_success():
    assert p.pack_reply(8, 1, 0, b"data") == p.HEADER.pack(8, 12, 1) + p.ERR.pack(0, 0) + b"data"
    assert p.pack_reply(8, 1, -1, b"data") == p.HEADER.pack(8, 8, 1) + p.ERR.pack(-1, 0)
