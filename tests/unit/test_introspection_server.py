"""docs/introspection.md §2-§3: the server against a tool over socket.socketpair() (pure: a fake Backend)."""
import socket
import struct
import threading

import pytest

from kvmgate.errors import KvmError
from kvmgate.introspection import ids
from kvmgate.introspection import protocol as p
from kvmgate.introspection.client import Client, Crash, IntrospectionError
from tests.introspection_fake import FakeBackend
from kvmgate.introspection.ids import CONTINUE, CRASH, RETRY
from kvmgate.introspection import Introspection

UUID = b"0123456789abcdef"
TIMEOUT = 5.0
LSTAR, SYSENTER_EIP, EFER = 0xC0000082, 0x176, 0xC0000080
STATE = p.pack_state(8, p.Regs(rip=0x401000, rsp=0x7FF0), p.Sregs(cr3=0x9000, efer=0xD01),
                     (0x10, 0, 0xFFFF1000, 0xD01, 0, 0xFFFF8000, 0, 0x0007040600070406, 0))


class Spawn(threading.Thread):
    """Runs fn(*args) on a thread standing for a vCPU thread; result(timeout) returns its value."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True, name="vcpu-test")
        self.fn, self.args, self.value, self.exc = fn, args, None, None
        self.start()

    def run(self):
        try:
            self.value = self.fn(*self.args)
        except BaseException as exc:   # reported by result()
            self.exc = exc

    def result(self, timeout=TIMEOUT):
        self.join(timeout)
        assert not self.is_alive(), "vCPU thread hangs"
        if self.exc:
            raise self.exc
        return self.value


class Rig:
    def __init__(self, **kw):
        self.backend = FakeBackend(vcpus=2, denied_msrs=[EFER])
        self.closes = []
        self.intro = Introspection(self.backend, obj="vm0", on_close=self.closes.append, **kw)
        self.hook()

    def hook(self):
        a, b = socket.socketpair()
        self.intro.hook(a, UUID)
        a.close()
        b.settimeout(TIMEOUT)
        self.sock = b
        self.client = Client(b)
        self.server = self.intro.server

    def allow_all(self):
        self.intro.allow_command(-1, 1)
        self.intro.allow_event(-1, 1)

    def raw(self, mid, payload=b"", seq=77):
        """Send one message; return (err, data) of its reply."""
        self.sock.sendall(p.pack_message(mid, seq, payload))
        msg = self.client._reader.read()
        assert msg is not None and (msg.id, msg.seq) == (mid, seq)
        err, pad = p.fixed(p.ERR, msg.payload)
        assert pad == 0
        return err, msg.payload[8:]

    def raw_vcpu(self, mid, vcpu, payload=b""):
        return self.raw(mid, p.VCPU_HDR.pack(vcpu, 0, 0) + payload)

    def send_closes(self, mid, payload=b""):
        """Send one message that must close the connection without a reply."""
        self.sock.sendall(p.pack_message(mid, 78, payload))
        self.wait_closed()
        assert "protocol error" in self.server.close_reason

    def wait_closed(self):
        assert self.server.join(TIMEOUT), "reader thread still running"
        assert self.sock.recv(100) == b""         # the tool sees EOF
        assert self.closes, "the owner was not told"

    def controlled_msr_on_vcpu0(self, msr=LSTAR):
        self.allow_all()
        self.client.vcpu_control_events(0, ids.VCPU_EVENT_MSR, True)
        self.client.control_msr(0, msr, True)

    def close(self):
        self.intro.unhook()
        self.sock.close()


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()
    assert not r.server.internal_errors


def code(exc_info):
    return exc_info.value.code


# --- commands -------------------------------------------------------------------------------

def test_get_version_is_always_allowed(rig):
    v = rig.client.get_version()
    assert (v.version, v.max_msg_size, v.features) == (1, 8184, bytes(8))


def test_disallowed_command_gets_eperm_and_does_nothing(rig):
    with pytest.raises(IntrospectionError) as ei:
        rig.client.get_info()
    assert ei.value.code == -1 and ei.value.name == "KVM_EPERM"
    with pytest.raises(IntrospectionError) as ei:
        rig.client.write_physical(0x100, b"evil")
    assert code(ei) == -ids.KVM_EPERM
    assert rig.backend.mem[0x100:0x104] == bytes(4)
    for cid in ids.COMMANDS - ids.ALWAYS_ALLOWED - rig.server.implemented:
        assert rig.raw(cid)[0] == -ids.KVM_ENOSYS


@pytest.mark.parametrize("mid", [0, 22, 24, 30, 31, 1234, 0xFFFF])
def test_unknown_id_closes_the_connection(rig, mid):
    rig.allow_all()
    rig.send_closes(mid, bytes(16))


def test_known_but_unimplemented_commands_enosys_even_when_allowed(rig):
    rig.allow_all()
    for cid in (ids.VM_SET_PAGE_ACCESS, ids.VCPU_TRANSLATE_GVA, ids.VM_CONTROL_CLEANUP,
                ids.VCPU_CONTROL_CR, ids.VCPU_GET_XSAVE):
        assert rig.raw_vcpu(cid, 0)[0] == -ids.KVM_ENOSYS
        with pytest.raises(IntrospectionError) as ei:
            rig.client.check_command(cid)
        assert code(ei) == -ids.KVM_ENOENT


def test_check_command_semantics(rig):
    c = rig.client
    for cid in ids.ALWAYS_ALLOWED:
        assert c.check_command(cid) is True
    assert c.check_command(ids.VM_READ_PHYSICAL) is False
    rig.intro.allow_command(ids.VM_READ_PHYSICAL, 1)      # changes while connected
    assert c.check_command(ids.VM_READ_PHYSICAL) is True
    rig.intro.allow_command(ids.VM_READ_PHYSICAL, 0)
    assert c.check_command(ids.VM_READ_PHYSICAL) is False
    for unknown in (0, 1, 22, 999):
        with pytest.raises(IntrospectionError) as ei:
            c.check_command(unknown)
        assert code(ei) == -ids.KVM_ENOENT
    assert rig.raw(ids.VM_CHECK_COMMAND, p.CHECK_REQ.pack(2, 1, 0))[0] == -ids.KVM_EINVAL
    assert rig.raw(ids.VM_CHECK_COMMAND, p.CHECK_REQ.pack(2, 0, 1))[0] == -ids.KVM_EINVAL


def test_check_event_semantics(rig):
    c = rig.client
    assert c.check_event(ids.VCPU_EVENT_MSR) is False
    rig.intro.allow_event(ids.VCPU_EVENT_MSR, 1)
    assert c.check_event(ids.VCPU_EVENT_MSR) is True
    for unknown in (2, 99, ids.VCPU_EVENT_CR):             # CR: never sent by this server
        with pytest.raises(IntrospectionError) as ei:
            c.check_event(unknown)
        assert code(ei) == -ids.KVM_ENOENT


def test_long_payloads_are_accepted(rig):
    assert rig.raw(ids.VM_CHECK_COMMAND, p.CHECK_REQ.pack(2, 0, 0) + b"junk" * 10) == (0, b"")
    err, data = rig.raw(ids.GET_VERSION, b"ignored")
    assert err == 0 and len(data) == 16


def test_short_payload_closes_the_connection(rig):
    # VM_CHECK_COMMAND with only the u16 id: shorter than its request
    rig.send_closes(ids.VM_CHECK_COMMAND, struct.pack("=H", ids.GET_VERSION))


@pytest.mark.parametrize("mid, payload", [
    (ids.VCPU_GET_INFO, b"\0" * 7),                                     # short vCPU header
    (ids.VCPU_CONTROL_MSR, p.VCPU_HDR.pack(0, 0, 0) + b"\1"),           # short request
    (ids.VM_WRITE_PHYSICAL, p.WRITE_PHYS_REQ.pack(0, 8, 0, 0) + b"abc"),  # data < size
    (ids.VCPU_GET_REGISTERS, p.VCPU_HDR.pack(0, 0, 0) + p.GET_REGS_REQ.pack(3, 0, 0) + bytes(8)),
])
def test_short_allowed_commands_close_the_connection(rig, mid, payload):
    rig.allow_all()
    rig.send_closes(mid, payload)


def test_short_disallowed_command_gets_eperm(rig):
    # the permission check comes first, as in the kernel
    assert rig.raw(ids.VCPU_CONTROL_MSR, b"\0")[0] == -ids.KVM_EPERM


def test_cpuid_inject_and_max_gfn(rig):
    rig.allow_all()
    err, data = rig.raw_vcpu(ids.VCPU_GET_CPUID, 1, p.GET_CPUID_REQ.pack(0, 0))
    assert err == 0 and p.GET_CPUID_RPL.unpack(data) == rig.backend.cpuid[(0, 0)]
    assert rig.raw_vcpu(ids.VCPU_GET_CPUID, 1, p.GET_CPUID_REQ.pack(0x1234, 0))[0] == \
        -ids.KVM_ENOENT
    assert rig.raw_vcpu(ids.VCPU_INJECT_EXCEPTION, 1, p.INJECT_REQ.pack(14, 0, 0, 2, 0xAB)) \
        == (0, b"")
    assert rig.backend.injected == [(1, 14, 2, 0xAB)]
    assert rig.raw_vcpu(ids.VCPU_INJECT_EXCEPTION, 0, p.INJECT_REQ.pack(14, 1, 0, 0, 0))[0] \
        == -ids.KVM_EINVAL
    assert rig.raw_vcpu(ids.VCPU_INJECT_EXCEPTION, 0, p.INJECT_REQ.pack(32, 0, 0, 0, 0))[0] \
        == -ids.KVM_EINVAL
    assert rig.backend.injected == [(1, 14, 2, 0xAB)]


def test_info_commands(rig):
    rig.allow_all()
    assert rig.client.get_info() == 2
    assert rig.client.vcpu_get_info(1) == 2_500_000 * 1000
    rig.backend.khz = None
    assert rig.client.vcpu_get_info(0) == 0


def test_bad_vcpu_and_padding_give_einval(rig):
    rig.allow_all()
    with pytest.raises(IntrospectionError) as ei:
        rig.client.vcpu_get_info(2)
    assert code(ei) == -ids.KVM_EINVAL
    assert rig.raw(ids.VCPU_GET_INFO, p.VCPU_HDR.pack(0, 1, 0))[0] == -ids.KVM_EINVAL
    assert rig.raw(ids.VCPU_GET_INFO, p.VCPU_HDR.pack(0, 0, 1))[0] == -ids.KVM_EINVAL
    assert rig.raw(ids.VM_READ_PHYSICAL, p.READ_PHYS_REQ.pack(0, 8, 0, 1))[0] == -ids.KVM_EINVAL
    assert rig.raw(ids.VM_CONTROL_EVENTS, p.CONTROL_EVENTS_REQ.pack(0, 1, 1, 0))[0] == -ids.KVM_EINVAL


def test_physical_memory(rig):
    rig.allow_all()
    c = rig.client
    c.write_physical(0x1FF0, b"hello")
    assert rig.backend.mem[0x1FF0:0x1FF5] == b"hello"
    assert c.read_physical(0x1FF0, 5) == b"hello"
    assert c.read_physical(0x1000, 4096) == bytes(rig.backend.mem[0x1000:0x2000])
    for gpa, size, err in ((0, 0, ids.KVM_EINVAL), (0xFFF, 2, ids.KVM_EINVAL),
                           (0x10000, 8, ids.KVM_ENOENT), (2**63, 8, ids.KVM_ENOENT)):
        with pytest.raises(IntrospectionError) as ei:
            c.read_physical(gpa, size)
        assert code(ei) == -err
    with pytest.raises(IntrospectionError) as ei:
        c.write_physical(0x20000, b"x")
    assert code(ei) == -ids.KVM_ENOENT


def test_vcpu_control_events(rig):
    c = rig.client
    with pytest.raises(IntrospectionError) as ei:
        c.vcpu_control_events(0, ids.VCPU_EVENT_MSR)      # command disallowed
    assert code(ei) == -ids.KVM_EPERM
    rig.intro.allow_command(-1, 1)
    with pytest.raises(IntrospectionError) as ei:
        c.vcpu_control_events(0, ids.VCPU_EVENT_MSR)      # event disallowed
    assert code(ei) == -ids.KVM_EPERM
    rig.intro.allow_event(-1, 1)
    for bad in (ids.VM_EVENT_UNHOOK, 2, 200):
        with pytest.raises(IntrospectionError) as ei:
            c.vcpu_control_events(0, bad)
        assert code(ei) == -ids.KVM_EINVAL
    c.vcpu_control_events(1, ids.VCPU_EVENT_MSR)
    assert rig.server.enabled_events(1) == {ids.VCPU_EVENT_MSR}
    assert rig.server.enabled_events(0) == frozenset()
    c.vcpu_control_events(1, ids.VCPU_EVENT_MSR, False)
    assert rig.server.enabled_events(1) == frozenset()
    with pytest.raises(IntrospectionError) as ei:
        c.control_events(ids.VCPU_EVENT_MSR)               # VM_CONTROL_EVENTS: only UNHOOK
    assert code(ei) == -ids.KVM_EINVAL
    c.control_events(ids.VM_EVENT_UNHOOK)
    assert rig.server.enabled_events() == {ids.VM_EVENT_UNHOOK}


def test_control_msr(rig):
    c = rig.client
    rig.intro.allow_command(-1, 1)
    with pytest.raises(IntrospectionError) as ei:
        c.control_msr(0, LSTAR)                          # MSR event not allowed
    assert code(ei) == -ids.KVM_EPERM
    rig.intro.allow_event(ids.VCPU_EVENT_MSR, 1)
    for bad in (0x2000, 0xC0002000, 0x40000000):
        with pytest.raises(IntrospectionError) as ei:
            c.control_msr(0, bad)
        assert code(ei) == -ids.KVM_EINVAL
    with pytest.raises(IntrospectionError) as ei:
        c.control_msr(0, EFER)                           # the owner's policy denies writes
    assert code(ei) == -ids.KVM_EPERM
    c.control_msr(0, LSTAR)
    c.control_msr(1, SYSENTER_EIP)
    assert rig.backend.controlled == {(0, LSTAR), (1, SYSENTER_EIP)}
    assert rig.intro.msr_controlled(0, LSTAR) and not rig.intro.msr_controlled(1, LSTAR)
    c.control_msr(1, SYSENTER_EIP, False)
    assert rig.backend.controlled == {(0, LSTAR)}
    assert rig.raw_vcpu(ids.VCPU_CONTROL_MSR, 0, p.CONTROL_MSR_REQ.pack(2, 0, 0, LSTAR))[0] == \
        -ids.KVM_EINVAL


def test_get_registers(rig):
    rig.allow_all()
    rig.backend.regs[1] = p.Regs(rip=0xABC).pack()
    rig.backend.msrs[1][LSTAR] = 0xFFFF8000
    r = rig.client.get_registers(1, [LSTAR, EFER])
    assert r.mode == 8 and r.regs.rip == 0xABC and r.msrs == [(LSTAR, 0xFFFF8000), (EFER, 0)]
    assert rig.client.get_registers(0).msrs == []
    assert len(rig.client.get_registers(0, [1] * 481).msrs) == 481
    with pytest.raises(IntrospectionError) as ei:
        rig.client.get_registers(0, [1] * 482)
    assert code(ei) == -ids.KVM_E2BIG


def test_set_registers_outside_an_event_is_eopnotsupp(rig):
    rig.allow_all()
    with pytest.raises(IntrospectionError) as ei:
        rig.client.set_registers(0, p.Regs(rax=1))
    assert code(ei) == -ids.KVM_EOPNOTSUPP and ei.value.name == "KVM_EOPNOTSUPP"


def test_backend_exception_becomes_an_error_code_not_a_close(rig):
    rig.allow_all()

    def boom(*a):
        raise KvmError(16, "KVM_GET_REGS")          # EBUSY is a KVM code
    rig.backend.get_registers = boom
    with pytest.raises(IntrospectionError) as ei:
        rig.client.get_registers(0)
    assert code(ei) == -ids.KVM_EBUSY
    rig.backend.read_physical = lambda *a: 1 / 0
    with pytest.raises(IntrospectionError) as ei:
        rig.client.read_physical(0, 1)
    assert code(ei) == -ids.KVM_EFAULT
    assert rig.client.get_version().version == 1
    assert rig.intro.connected


# --- events ---------------------------------------------------------------------------------

def test_msr_event_round_trip(rig):
    rig.controlled_msr_on_vcpu0()
    vcpu = Spawn(rig.intro.msr_event, 0, LSTAR, 0xFFFF8000, 0x6666, STATE)
    ev = rig.client.next_event()
    assert (ev.event, ev.vcpu, ev.msr, ev.old, ev.new) == (ids.VCPU_EVENT_MSR, 0, LSTAR, 0xFFFF8000, 0x6666)
    assert ev.state.mode == 8 and ev.regs.rip == 0x401000 and ev.sregs.cr3 == 0x9000
    assert ev.state.msr("lstar") == 0xFFFF8000
    assert rig.server.waiting(0)
    ev.reply_msr(0xFFFF8000)                    # revert the malicious change
    assert vcpu.result() == (CONTINUE, 0xFFFF8000)
    assert not rig.server.waiting(0)
    # the tool keeps the guest's value / crashes the guest
    vcpu = Spawn(rig.intro.msr_event, 0, LSTAR, 1, 2, lambda: STATE)
    rig.client.next_event().reply_msr()
    assert vcpu.result() == (CONTINUE, 2)
    vcpu = Spawn(rig.intro.msr_event, 0, LSTAR, 1, 3, STATE)
    rig.client.next_event().reply(CRASH)
    assert vcpu.result() == (CRASH, 1)
    vcpu = Spawn(rig.intro.msr_event, 0, LSTAR, 1, 3, STATE)
    rig.client.next_event().reply(RETRY)
    assert vcpu.result() == (RETRY, 1)


def test_msr_event_wire_sizes(rig):
    rig.controlled_msr_on_vcpu0()
    vcpu = Spawn(rig.intro.msr_event, 0, LSTAR, 1, 2, STATE)
    head = rig.sock.recv(8, socket.MSG_WAITALL)
    mid, size, seq = p.HEADER.unpack(head)
    body = rig.sock.recv(size, socket.MSG_WAITALL)
    assert (mid, 8 + len(body)) == (ids.MSG_VCPU_EVENT, 584)
    assert body[16:16 + 536] == STATE
    reply = p.pack_event_reply(seq, 0, CONTINUE, ids.VCPU_EVENT_MSR, p.MSR_REPLY.pack(7))
    assert len(reply) == 32
    rig.sock.sendall(reply)
    assert vcpu.result() == (CONTINUE, 7)


def test_no_msr_event_unless_controlled_enabled_allowed_and_changed(rig):
    calls = []
    state = lambda: calls.append(1) or STATE      # noqa: E731 (must not be called)
    rig.controlled_msr_on_vcpu0()
    assert rig.intro.msr_event(0, LSTAR, 5, 5, state) == (CONTINUE, 5)        # unchanged
    assert rig.intro.msr_event(0, SYSENTER_EIP, 5, 6, state) == (CONTINUE, 6)  # not controlled
    assert rig.intro.msr_event(1, LSTAR, 5, 6, state) == (CONTINUE, 6)         # other vCPU
    rig.client.vcpu_control_events(0, ids.VCPU_EVENT_MSR, False)
    assert rig.intro.msr_event(0, LSTAR, 5, 6, state) == (CONTINUE, 6)         # not enabled
    rig.client.vcpu_control_events(0, ids.VCPU_EVENT_MSR, True)
    rig.intro.allow_event(ids.VCPU_EVENT_MSR, 0)
    assert rig.intro.msr_event(0, LSTAR, 5, 6, state) == (CONTINUE, 6)         # now disallowed
    assert calls == []


def test_set_registers_while_the_vcpu_waits(rig):
    rig.controlled_msr_on_vcpu0()
    vcpu = Spawn(rig.intro.msr_event, 0, LSTAR, 1, 2, STATE)
    ev = rig.client.next_event()
    regs = ev.regs._replace(rip=ev.regs.rip + 2, rax=0x42)
    rig.client.set_registers(0, regs)
    with pytest.raises(IntrospectionError):            # vCPU 1 waits for nothing
        rig.client.set_registers(1, regs)
    assert rig.backend.set_regs_calls == []            # delayed until the reply
    ev.reply_msr()
    assert vcpu.result() == (CONTINUE, 2)
    assert rig.backend.set_regs_calls == [(0, regs.pack(), "vcpu-test")]


def test_commands_answered_while_a_vcpu_waits(rig):
    rig.controlled_msr_on_vcpu0()
    vcpu = Spawn(rig.intro.msr_event, 0, LSTAR, 1, 2, STATE)
    ev = rig.client.next_event()
    assert rig.client.get_registers(0, [LSTAR]).mode == 8
    assert rig.client.read_physical(0, 4) == bytes(4)
    ev.reply_msr(9)
    assert vcpu.result() == (CONTINUE, 9)


def test_pause(rig):
    rig.intro.allow_command(-1, 1)
    with pytest.raises(IntrospectionError) as ei:
        rig.client.pause_vcpu(1)
    assert code(ei) == -ids.KVM_EPERM                   # PAUSE event disallowed
    rig.intro.allow_event(ids.VCPU_EVENT_PAUSE, 1)
    rig.client.pause_vcpu(1, wait=True)
    rig.client.pause_vcpu(1)
    assert rig.backend.pause_calls == [(1, True), (1, False)]
    assert rig.intro.pending_pauses(1) == 2 and rig.intro.pending_pauses(0) == 0
    assert rig.intro.handle_pauses(0, STATE) == CONTINUE   # nothing pending: no event
    vcpu = Spawn(rig.intro.handle_pauses, 1, STATE)
    for action in (CONTINUE, CRASH):
        ev = rig.client.next_event()
        assert (ev.event, ev.vcpu, ev.payload) == (ids.VCPU_EVENT_PAUSE, 1, b"")
        ev.reply(action)
    assert vcpu.result() == CRASH
    assert rig.intro.pending_pauses(1) == 0
    with pytest.raises(IntrospectionError) as ei:
        rig.client.pause_vcpu(2)
    assert code(ei) == -ids.KVM_EINVAL


def test_pause_busy_after_too_many_requests(rig):
    rig.allow_all()
    from kvmgate.introspection.server import MAX_PAUSE_REQUESTS
    for _ in range(MAX_PAUSE_REQUESTS):
        rig.client.pause_vcpu(0)
    with pytest.raises(IntrospectionError) as ei:
        rig.client.pause_vcpu(0)
    assert code(ei) == -ids.KVM_EBUSY


def test_serve_loop_reverts_lstar_changes(rig):
    rig.controlled_msr_on_vcpu0()
    rig.client.control_msr(0, SYSENTER_EIP)
    rig.client.control_events(ids.VM_EVENT_UNHOOK)
    seen = []

    def on_msr(ev):
        seen.append((ev.msr, ev.new))
        if ev.msr == LSTAR:
            return ev.old
        if ev.new == 0xBAD:
            raise Crash()
        return None

    def tool():
        how = rig.client.serve(on_msr)
        rig.sock.shutdown(socket.SHUT_RDWR)      # a tool closes once it sees UNHOOK
        return how

    tool = Spawn(tool)
    assert Spawn(rig.intro.msr_event, 0, LSTAR, 0x1000, 0x2000, STATE).result() == (CONTINUE, 0x1000)
    assert Spawn(rig.intro.msr_event, 0, SYSENTER_EIP, 1, 2, STATE).result() == (CONTINUE, 2)
    assert Spawn(rig.intro.msr_event, 0, SYSENTER_EIP, 1, 0xBAD, STATE).result() == (CRASH, 1)
    assert rig.intro.unhook(wait=TIMEOUT)       # the tool gets UNHOOK and closes its end
    assert tool.result() == "unhook"
    assert seen == [(LSTAR, 0x2000), (SYSENTER_EIP, 2), (SYSENTER_EIP, 0xBAD)]


def test_unhook_sends_unhook_event_and_undoes_interceptions(rig):
    rig.controlled_msr_on_vcpu0()
    rig.client.control_events(ids.VM_EVENT_UNHOOK)
    assert rig.backend.controlled == {(0, LSTAR)}
    assert rig.intro.unhook() is True
    ev = rig.client.next_event()
    assert (ev.event, ev.vcpu) == (ids.VM_EVENT_UNHOOK, None)
    assert rig.client.next_event() is None              # then EOF
    assert rig.backend.controlled == set()
    assert rig.closes == ["unhook"]
    assert rig.intro.msr_event(0, LSTAR, 1, 2, STATE) == (CONTINUE, 2)   # the guest keeps running
    assert not rig.intro.hooked


def test_no_unhook_event_unless_enabled(rig):
    rig.allow_all()
    rig.intro.unhook()
    assert rig.client.next_event() is None


# --- broken tools ----------------------------------------------------------------------------

def test_disconnect_while_a_vcpu_waits_releases_it(rig):
    rig.controlled_msr_on_vcpu0()
    vcpu = Spawn(rig.intro.msr_event, 0, LSTAR, 1, 2, STATE)
    rig.client.next_event()
    rig.sock.close()
    assert vcpu.result() == (CONTINUE, 2)           # the guest's value
    assert rig.server.join(TIMEOUT)
    assert rig.closes and rig.backend.controlled == set()
    assert rig.intro.hooked and not rig.intro.connected
    with pytest.raises(KvmError) as ei:              # as in the kernel: unhook before re-hooking
        rig.intro.hook(socket.socketpair()[0], UUID)
    assert ei.value.errno == 17
    assert rig.intro.msr_event(0, LSTAR, 1, 2, STATE) == (CONTINUE, 2)
    rig.intro.unhook()
    rig.hook()
    assert rig.client.get_version().version == 1


def _assert_survives(rig):
    """After a closed connection: the owner can unhook and hook a new tool."""
    rig.wait_closed()
    assert not rig.server.internal_errors
    rig.intro.unhook()
    rig.hook()
    rig.allow_all()
    assert rig.client.get_info() == 2


def test_oversized_message_closes_the_connection(rig):
    rig.allow_all()
    rig.sock.sendall(p.HEADER.pack(ids.GET_VERSION, 8185, 1))
    _assert_survives(rig)
    assert "size 8185" in rig.closes[0]


def test_max_size_message_is_fine(rig):
    assert rig.raw(ids.GET_VERSION, bytes(8184))[0] == 0


def test_eof_inside_a_message_closes(rig):
    rig.sock.sendall(p.HEADER.pack(ids.GET_VERSION, 100, 1) + bytes(10))
    rig.sock.shutdown(socket.SHUT_WR)
    _assert_survives(rig)


def test_unexpected_event_reply_closes(rig):
    rig.sock.sendall(p.pack_event_reply(1, 0, CONTINUE, ids.VCPU_EVENT_MSR, p.MSR_REPLY.pack(0)))
    _assert_survives(rig)


@pytest.mark.parametrize("breakage", ["seq", "padding", "long", "action", "event", "vcpu", "short"])
def test_bad_event_reply_closes_and_releases_the_vcpu(rig, breakage):
    rig.controlled_msr_on_vcpu0()
    vcpu = Spawn(rig.intro.msr_event, 0, LSTAR, 1, 2, STATE)
    ev = rig.client.next_event()
    seq, vc, action, event, data = ev.seq, 0, CONTINUE, ids.VCPU_EVENT_MSR, p.MSR_REPLY.pack(5)
    if breakage == "seq":
        seq += 1
    elif breakage == "long":
        data += b"\0"
    elif breakage == "action":
        action = 3
    elif breakage == "event":
        event = ids.VCPU_EVENT_PAUSE
    elif breakage == "vcpu":
        vc = 1
    raw = bytearray(p.pack_event_reply(seq, vc, action, event, data))
    if breakage == "padding":
        raw[8 + 8 + 7] = 1
    if breakage == "short":
        raw = bytearray(p.pack_message(ids.MSG_VCPU_EVENT, seq, bytes(raw[8:20])))
    rig.sock.sendall(raw)
    assert vcpu.result() == (CONTINUE, 2)
    _assert_survives(rig)
    assert "protocol error" in rig.closes[0]


def test_short_msr_reply_payload_reads_as_zero(rig):
    rig.controlled_msr_on_vcpu0()
    vcpu = Spawn(rig.intro.msr_event, 0, LSTAR, 1, 2, STATE)
    ev = rig.client.next_event()
    rig.sock.sendall(p.pack_event_reply(ev.seq, 0, CONTINUE, ids.VCPU_EVENT_MSR, b"\x05"))
    assert vcpu.result() == (CONTINUE, 5)
    assert rig.intro.connected


def test_event_timeout_releases_the_vcpu():
    r = Rig(event_timeout=0.2)
    try:
        r.controlled_msr_on_vcpu0()
        # nobody answers: the event timeout, not the test's hang guard, releases the vCPU
        assert Spawn(r.intro.msr_event, 0, LSTAR, 1, 2, STATE).result() == (CONTINUE, 2)
        assert r.server.join(TIMEOUT) and "no reply" in r.closes[0]
    finally:
        r.close()


def test_unhook_while_a_vcpu_waits_releases_it(rig):
    rig.controlled_msr_on_vcpu0()
    vcpu = Spawn(rig.intro.msr_event, 0, LSTAR, 1, 2, STATE)
    rig.client.next_event()
    rig.intro.unhook()
    assert vcpu.result() == (CONTINUE, 2)
    assert rig.backend.controlled == set()


def test_unhook_from_the_on_close_callback():
    r = Rig()
    r.intro.on_close = lambda reason: r.intro.unhook()
    try:
        r.sock.sendall(p.HEADER.pack(2, 9000, 0))
        assert r.server.join(TIMEOUT)
        assert not r.intro.hooked
    finally:
        r.close()
