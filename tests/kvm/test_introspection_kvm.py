"""Introspection on the running kernel: the owner API on a live Machine, a tool over a socketpair
or the unix socket, MSR events for real guest WRMSRs, pause, safety, the CLI.

Every wait is bounded: runs have timeouts, tool threads are joined with a deadline.
"""
import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from kvmgate import Machine, MsrFilter, MsrRange, WRITE
from kvmgate.errors import KvmError, UserError
from kvmgate.guest import DATA
from kvmgate.introspection import ids
from kvmgate.introspection import listener as listener_mod
from kvmgate.introspection import protocol as p
from kvmgate.introspection.client import Client, IntrospectionError
from kvmgate.introspection.ids import CONTINUE, CRASH
from kvmgate.introspection.machine_backend import IntrospectionCrash, MachineBackend, attach
from kvmgate.msr.model import EXIT_REASON_FILTER
from kvmgate.introspection.session import serve as serve_introspection

pytestmark = pytest.mark.kvm

UUID = b"0123456789abcdef"
T = 5.0
HANG = 60.0        # waits for another process or thread: a hang guard, generous under load
ROOT = Path(__file__).resolve().parents[2]
LSTAR, SYSENTER_EIP, EFER = 0xC0000082, 0x176, 0xC0000080
FIRST, SECOND = 0x11110000, 0x22220000
FLAG = DATA                      # spinning guests wait for a non-zero qword here

# Writes LSTAR twice, reads it back into RBX (and the second value of RSI after the writes).
LSTAR_TWICE = f"""
    mov ecx, {LSTAR:#x}
    xor edx, edx
    xor esi, esi
    mov eax, {FIRST:#x}
    wrmsr
    mov eax, {SECOND:#x}
    wrmsr
    mov r12, rsi
    rdmsr
    mov rbx, rax
    hlt"""

# Says it is running (READY := 1), spins until FLAG is set, writes LSTAR := FLAG, reads it
# back into RBX.
READY = FLAG + 8
SPIN_THEN_LSTAR = f"""
    mov rsi, {FLAG:#x}
    mov qword ptr [rsi + 8], 1
spin:
    pause
    mov rax, [rsi]
    test rax, rax
    jz spin
    mov ecx, {LSTAR:#x}
    xor edx, edx
    wrmsr
    rdmsr
    mov rbx, rax
    hlt"""


class Spawn(threading.Thread):
    """fn(*args) on a thread; result() joins with a deadline and re-raises."""

    def __init__(self, fn, *args, **kw):
        super().__init__(daemon=True, name="test-spawn")
        self.fn, self.args, self.kw, self.value, self.exc = fn, args, kw, None, None
        self.start()

    def run(self):
        try:
            self.value = self.fn(*self.args, **self.kw)
        except BaseException as exc:   # reported by result()
            self.exc = exc

    def result(self, timeout=T):
        self.join(timeout)
        assert not self.is_alive(), f"{self.fn} hangs"
        if self.exc:
            raise self.exc
        return self.value


def hook(m, commands=(), events=(), **attach_opts):
    """Hook a tool over a socketpair; return (intro, client)."""
    intro = attach(m, **attach_opts)
    a, b = socket.socketpair()
    intro.hook(a, UUID)
    a.close()
    for c in commands:
        intro.allow_command(c, 1)
    for e in events:
        intro.allow_event(e, 1)
    b.settimeout(T)
    return intro, Client(b)


MSR_TOOL_COMMANDS = (ids.VCPU_CONTROL_EVENTS, ids.VCPU_CONTROL_MSR)


def watch(client, msr=LSTAR, vcpu=0):
    client.vcpu_control_events(vcpu, ids.VCPU_EVENT_MSR, True)
    client.control_msr(vcpu, msr, True)


def wait_until(cond, timeout=HANG, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def code(fn, *args):
    with pytest.raises(IntrospectionError) as ei:
        fn(*args)
    return ei.value.code


def kvm_errno(fn, *args):
    with pytest.raises(KvmError) as ei:
        fn(*args)
    return ei.value.errno


@pytest.fixture
def machine():
    m = Machine(LSTAR_TWICE)
    yield m
    intro = m.__dict__.get("introspection")
    if intro is not None:
        intro.unhook()
    m.close()


# --- the owner API and the permission model against the live server -------------------------

def test_attach_is_idempotent_and_sets_machine_introspection(machine):
    intro = attach(machine)
    assert machine.introspection is intro and attach(machine) is intro
    assert isinstance(intro.backend, MachineBackend) and intro.backend.machine is machine
    attach(machine, event_timeout=3.0)
    assert intro.event_timeout == 3.0
    assert not intro.hooked


def test_defaults_after_hook(machine):
    intro, c = hook(machine)
    with c:
        assert c.get_version().version == 1
        assert c.check_command(ids.GET_VERSION) and c.check_command(ids.VM_CHECK_EVENT)
        assert not c.check_command(ids.VM_GET_INFO)
        assert not c.check_event(ids.VCPU_EVENT_MSR)
        for mid, payload in [(ids.VM_GET_INFO, b""), (ids.VM_READ_PHYSICAL, p.READ_PHYS_REQ.pack(0, 8, 0, 0)),
                             (ids.VM_PAUSE_VCPU, p.PAUSE_REQ.pack(0, 0, 0, 0))]:
            assert code(c.request, mid, payload) == -ids.KVM_EPERM
        assert code(c.control_msr, 0, LSTAR) == -ids.KVM_EPERM
        assert code(c.get_registers, 0) == -ids.KVM_EPERM
        assert code(c.request, ids.VCPU_CONTROL_CR) == -ids.KVM_ENOSYS   # known, not served
        assert intro.permissions.allowed_events() == frozenset()
        c.sock.sendall(p.pack_message(ids.VM(60), 9))       # unknown id: the connection closes
        assert c.sock.recv(64) == b""
        assert intro.server.join(T) and "unknown message id" in intro.server.close_reason


def test_hook_errors(machine):
    intro = attach(machine)
    dgram_a, dgram_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    unconnected = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with open(os.devnull) as f, dgram_a, dgram_b, unconnected:
        for bad in (dgram_a, unconnected, f.fileno(), "nope"):
            assert kvm_errno(intro.hook, bad, UUID) == errno.EINVAL
        a, b = socket.socketpair()
        with a, b:
            assert kvm_errno(intro.hook, a, b"short") == errno.EINVAL
            assert not intro.hooked
            intro.hook(a, UUID)
            assert kvm_errno(intro.hook, a, UUID) == errno.EEXIST
            assert intro.unhook() and not intro.unhook()
            intro.hook(a, UUID)      # hookable again after unhook
            intro.unhook()


def test_allow_errors(machine):
    intro = attach(machine)
    # Not hooked yet: EFAULT (after the argument checks).
    assert kvm_errno(intro.allow_command, ids.VM_GET_INFO, 1) == errno.EFAULT
    assert kvm_errno(intro.allow_event, ids.VCPU_EVENT_MSR, 1) == errno.EFAULT
    assert kvm_errno(intro.allow_command, ids.VM_GET_INFO, 2) == errno.EINVAL
    a, b = socket.socketpair()
    with a, b:
        intro.hook(a, UUID)
        for fn, unknown in ((intro.allow_command, 22), (intro.allow_event, 2)):
            assert kvm_errno(fn, -1, 2) == errno.EINVAL          # allow > 1
            assert kvm_errno(fn, -2, 1) == errno.EINVAL          # id < -1
            assert kvm_errno(fn, unknown, 1) == errno.EINVAL     # not a known id
            assert kvm_errno(fn, 1 << 20, 0) == errno.EINVAL
        for always in ids.ALWAYS_ALLOWED:
            assert kvm_errno(intro.allow_command, always, 0) == errno.EPERM
        intro.allow_command(-1, 0)             # resets to the three, no error
        assert intro.permissions.allowed_commands() == ids.ALWAYS_ALLOWED
        intro.enabled = False                  # like kvm.introspection=0
        assert kvm_errno(intro.allow_command, ids.VM_GET_INFO, 1) == errno.EPERM
        assert kvm_errno(intro.allow_event, ids.VCPU_EVENT_MSR, 1) == errno.EPERM
        intro.unhook()
        assert kvm_errno(intro.hook, a, UUID) == errno.EPERM
        # EPERM (disabled) comes before EINVAL
        assert kvm_errno(intro.allow_command, -5, 7) == errno.EPERM


def test_disabled_at_attach():
    with Machine("hlt") as m:
        intro = attach(m, enabled=False)
        a, b = socket.socketpair()
        with a, b:
            assert kvm_errno(intro.hook, a, UUID) == errno.EPERM


def test_permission_changes_while_connected(machine):
    intro, c = hook(machine)
    with c:
        assert code(c.get_info) == -ids.KVM_EPERM
        intro.allow_command(-1, 1)
        assert c.get_info() == 1
        assert c.vcpu_get_info(0) > 0                              # TSC in Hz
        intro.allow_command(ids.VM_GET_INFO, 0)
        assert code(c.get_info) == -ids.KVM_EPERM
        intro.allow_command(-1, 0)
        assert code(c.vcpu_get_info, 0) == -ids.KVM_EPERM and c.get_version()
        # event permission: VCPU_CONTROL_EVENTS / VCPU_CONTROL_MSR need the event allowed
        intro.allow_command(-1, 1)
        assert code(c.vcpu_control_events, 0, ids.VCPU_EVENT_MSR) == -ids.KVM_EPERM
        assert code(c.control_msr, 0, LSTAR) == -ids.KVM_EPERM
        intro.allow_event(ids.VCPU_EVENT_MSR, 1)
        watch(c)
        assert intro.backend.intercepted == {LSTAR}
        # the owner withdraws the MSR event: the guest's writes are no longer sent
        intro.allow_event(-1, 0)
        r = machine.run(timeout=T)
        assert r.regs.rbx == SECOND and intro.backend.msr_events == 0


def test_vcpu_control_msr_errors(machine):
    intro, c = hook(machine, commands=[-1], events=[-1])
    with c:
        for bad in (0x2000, 0xBFFFFFFF, 0xC0002000, 0xFFFFFFFF):
            assert code(c.control_msr, 0, bad) == -ids.KVM_EINVAL
        assert code(c.control_msr, 1, LSTAR) == -ids.KVM_EINVAL          # no vCPU 1
        assert code(c.control_msr, 0, 0x808) == -ids.KVM_EOPNOTSUPP      # x2APIC: never filtered
        c.control_msr(0, 0x1FFF)
        c.control_msr(0, 0xC0001FFF)
        c.control_msr(0, 0x1FFF, False)
        c.control_msr(0, 0xC0001FFF, False)
        assert intro.backend.intercepted == frozenset()
        # the owner's filter denies guest writes of LSTAR: EPERM
        machine.set_msr_filter(MsrFilter([MsrRange.all(WRITE, LSTAR, 1, allow=False)]))
        assert code(c.control_msr, 0, LSTAR) == -ids.KVM_EPERM
        machine.set_msr_filter(None)
        c.control_msr(0, LSTAR)
        c.control_msr(0, LSTAR, False)


def test_vcpu_control_msr_eperm_under_the_owners_policy(machine):
    from kvmgate.policy import parse_policy
    machine.set_policy(parse_policy("""
[policy]
name = "t"
default = "allow"
[[rule]]
msr = "IA32_LSTAR"
access = "write"
action = "deny"
"""))
    intro, c = hook(machine, commands=[-1], events=[-1])
    with c:
        assert code(c.control_msr, 0, LSTAR) == -ids.KVM_EPERM
        c.control_msr(0, SYSENTER_EIP)                          # the policy allows this one


def test_other_command_errors_on_the_live_vm(machine):
    intro, c = hook(machine, commands=[-1], events=[ids.VCPU_EVENT_MSR])
    with c:
        size = machine.mem_size
        assert code(c.read_physical, size, 8) == -ids.KVM_ENOENT
        assert code(c.read_physical, 0xFFC, 8) == -ids.KVM_EINVAL        # crosses a page
        assert code(c.read_physical, 0, 0) == -ids.KVM_EINVAL
        assert code(c.write_physical, size, b"x") == -ids.KVM_ENOENT
        assert code(c.set_registers, 0, p.Regs()) == -ids.KVM_EOPNOTSUPP  # no event pending
        assert code(c.pause_vcpu, 0) == -ids.KVM_EPERM                    # PAUSE not allowed
        assert code(c.get_registers, 0, [0x12345678]) == -ids.KVM_EINVAL  # unreadable MSR
        assert code(c.vcpu_control_events, 0, ids.VCPU_EVENT_CR) == -ids.KVM_EINVAL
        assert code(c.vcpu_control_events, 0, ids.VM_EVENT_UNHOOK) == -ids.KVM_EINVAL
        assert code(c.get_registers, 5) == -ids.KVM_EINVAL


def test_memory_and_registers_of_a_stopped_vm(machine):
    intro, c = hook(machine, commands=[-1])
    with c:
        c.write_physical(DATA + 0xFF8, b"kvmgate!")
        assert bytes(machine.memory[DATA + 0xFF8:DATA + 0x1000]) == b"kvmgate!"
        assert c.read_physical(DATA + 0xFF8, 8) == b"kvmgate!"
        machine.vcpus[0].set_msrs({LSTAR: 0xFFFF800000001000})
        regs = c.get_registers(0, [LSTAR, EFER])
        assert dict(regs.msrs)[LSTAR] == 0xFFFF800000001000
        assert dict(regs.msrs)[EFER] == 0 and regs.mode == 2   # reset state: real mode
        assert c.get_info() == 1


# --- MSR events end to end ------------------------------------------------------------------

def test_lstar_events_end_to_end_and_revert(machine):
    """Both writes arrive with old and new values; the second is reverted; the guest reads back
    the value the tool chose."""
    intro, c = hook(machine, commands=MSR_TOOL_COMMANDS, events=[ids.VCPU_EVENT_MSR])
    seen = []

    def on_msr(ev):
        seen.append((ev.vcpu, ev.msr, ev.old, ev.new, ev.state.mode, ev.state.msr("lstar"),
                     ev.regs.rcx, ev.sregs.efer))
        return ev.old if len(seen) == 2 else None

    with c:
        watch(c)
        assert intro.backend.intercepted == {LSTAR}
        tool = Spawn(c.serve, on_msr=on_msr)
        r = machine.run(timeout=T)
        assert [s[:4] for s in seen] == [(0, LSTAR, 0, FIRST), (0, LSTAR, FIRST, SECOND)]
        for s in seen:
            assert s[4] == 8 and s[5] == s[2] and s[6] == LSTAR and s[7] & 0x500 == 0x500
        assert r.regs.rbx == FIRST                    # the reverted value
        assert machine.vcpus[0].get_msrs([LSTAR])[LSTAR] == FIRST
        assert len(r.msr_exits) == 2 and r.gp_faults == []
        intro.unhook()
        assert tool.result() == "eof"
    assert intro.backend.intercepted == frozenset()


def test_tool_chooses_another_value(machine):
    intro, c = hook(machine, commands=MSR_TOOL_COMMANDS, events=[ids.VCPU_EVENT_MSR])
    with c:
        watch(c)
        tool = Spawn(c.serve, on_msr=lambda ev: 0x33330000 if ev.new == SECOND else None)
        r = machine.run(timeout=T)
        assert r.regs.rbx == 0x33330000
        intro.unhook()
        assert tool.result() == "eof"


def test_no_permission_means_eperm_and_no_exits(machine):
    """Without VCPU_CONTROL_MSR (or without the MSR event) the tool gets -KVM_EPERM and the
    guest's LSTAR writes never leave the kernel."""
    intro, c = hook(machine, commands=[ids.VCPU_CONTROL_EVENTS])
    with c:
        e = code(c.control_msr, 0, LSTAR)
        assert e == -1 == -ids.KVM_EPERM
        intro.allow_command(ids.VCPU_CONTROL_MSR, 1)          # command, but not the event
        assert code(c.control_msr, 0, LSTAR) == -ids.KVM_EPERM
        assert code(c.vcpu_control_events, 0, ids.VCPU_EVENT_MSR) == -ids.KVM_EPERM
        r = machine.run(timeout=T)
    assert r.msr_exits == [] and r.regs.rbx == SECOND
    assert intro.backend.msr_writes == 0 and intro.backend.intercepted == frozenset()


def test_released_control_means_no_exits(machine):
    intro, c = hook(machine, commands=MSR_TOOL_COMMANDS, events=[ids.VCPU_EVENT_MSR])
    with c:
        watch(c)
        c.control_msr(0, LSTAR, False)
        assert intro.backend.intercepted == frozenset()
        r = machine.run(timeout=T)
    assert r.msr_exits == [] and r.regs.rbx == SECOND


def test_controlled_without_the_event_enabled_sends_nothing(machine):
    intro, c = hook(machine, commands=MSR_TOOL_COMMANDS, events=[ids.VCPU_EVENT_MSR])
    with c:
        c.control_msr(0, LSTAR)
        r = machine.run(timeout=T)
        assert r.regs.rbx == SECOND and intro.backend.msr_events == 0
        assert intro.backend.msr_writes == 2                 # intercepted, answered at once


def test_unchanged_value_sends_no_event():
    guest = f"""
    mov ecx, {LSTAR:#x}
    xor edx, edx
    mov eax, {FIRST:#x}
    wrmsr
    wrmsr
    hlt"""
    with Machine(guest) as m:
        intro, c = hook(m, commands=MSR_TOOL_COMMANDS, events=[ids.VCPU_EVENT_MSR])
        with c:
            watch(c)
            seen = []
            tool = Spawn(c.serve, on_msr=lambda ev: seen.append(ev.new))
            m.run(timeout=T)
            assert seen == [FIRST] and intro.backend.msr_writes == 2
            intro.unhook()
            tool.result()


def test_crash_stops_the_vm(machine):
    intro, c = hook(machine, commands=MSR_TOOL_COMMANDS, events=[ids.VCPU_EVENT_MSR])
    with c:
        watch(c)
        tool = Spawn(c.serve, on_msr=lambda ev: CRASH)
        with pytest.raises(IntrospectionCrash) as ei:
            machine.run(timeout=T)
        assert ei.value.vcpu == 0 and ei.value.msr == LSTAR and "CRASH" in str(ei.value)
        assert machine.vcpus[0].get_msrs([LSTAR])[LSTAR] == 0       # the write never happened
        intro.unhook()
        tool.result()


def test_set_registers_during_an_msr_event(machine):
    intro, c = hook(machine, commands=MSR_TOOL_COMMANDS + (ids.VCPU_SET_REGISTERS,),
                    events=[ids.VCPU_EVENT_MSR])

    def on_msr(ev):
        if ev.new == SECOND:
            c.set_registers(ev.vcpu, ev.regs._replace(rsi=0x5151))
        return None

    with c:
        watch(c)
        tool = Spawn(c.serve, on_msr=on_msr)
        r = machine.run(timeout=T)
        assert r.regs.r12 == 0x5151 and r.regs.rbx == SECOND
        intro.unhook()
        tool.result()


def test_control_msr_from_inside_an_event_does_not_deadlock():
    """A filter swap while the vCPU waits for the tool: the waiting vCPU counts as parked."""
    guest = f"""
    xor edx, edx
    mov ecx, {LSTAR:#x}
    mov eax, {FIRST:#x}
    wrmsr
    mov ecx, {SYSENTER_EIP:#x}
    mov eax, 0x4444
    wrmsr
    hlt"""
    with Machine(guest) as m:
        intro, c = hook(m, commands=MSR_TOOL_COMMANDS, events=[ids.VCPU_EVENT_MSR])
        seen = []

        def on_msr(ev):
            seen.append(ev.msr)
            if ev.msr == LSTAR:
                c.control_msr(ev.vcpu, SYSENTER_EIP)

        with c:
            watch(c)
            tool = Spawn(c.serve, on_msr=on_msr)
            m.run(timeout=T)                 # a deadlock ends in TimeoutError
            assert seen == [LSTAR, SYSENTER_EIP]
            assert intro.backend.intercepted == {LSTAR, SYSENTER_EIP}
            intro.unhook()
            tool.result()


# vCPU i (in RDI) writes LSTAR = 0x10000 + (i << 16), leaving that value in EDX:EAX
EACH_VCPU_WRITES_LSTAR = f"""
    mov ecx, {LSTAR:#x}
    xor edx, edx
    mov eax, edi
    shl eax, 16
    add eax, 0x10000
    wrmsr"""


def test_two_vcpus_waiting_while_the_tool_swaps_the_filter():
    """Both vCPUs wait for replies while the tool enables another MSR on each."""
    guest = f"""{EACH_VCPU_WRITES_LSTAR}
    mov ecx, {SYSENTER_EIP:#x}
    wrmsr
    hlt"""
    with Machine(guest, vcpus=2) as m:
        intro, c = hook(m, commands=MSR_TOOL_COMMANDS, events=[ids.VCPU_EVENT_MSR])
        with c:
            for v in (0, 1):
                watch(c, vcpu=v)

            def tool():
                first = [c.next_event(), c.next_event()]         # both vCPUs now wait
                assert intro.server.waiting(0) and intro.server.waiting(1)
                for v in (0, 1):                 # a deadlock: the client's socket timeout
                    c.control_msr(v, SYSENTER_EIP)
                for ev in first:
                    ev.reply_msr()
                rest = [c.next_event(), c.next_event()]
                for ev in rest:
                    ev.reply_msr()
                return sorted((ev.vcpu, ev.msr) for ev in first + rest)

            t = Spawn(tool)
            m.run(timeout=T)
            seen = t.result()
            assert seen == [(0, SYSENTER_EIP), (0, LSTAR), (1, SYSENTER_EIP), (1, LSTAR)]
            intro.unhook()


def test_owner_filter_is_not_weakened():
    """The owner denies SYSENTER_EIP writes (its handler injects #GP); the tool's LSTAR
    interception changes nothing about that."""
    guest = f"""
    xor edx, edx
    mov ecx, {SYSENTER_EIP:#x}
    mov eax, 0x4444
    wrmsr
    mov ecx, {LSTAR:#x}
    mov eax, {FIRST:#x}
    wrmsr
    hlt"""
    with Machine(guest) as m:
        m.set_msr_filter(MsrFilter([MsrRange.all(WRITE, SYSENTER_EIP, 1, allow=False)]))
        m.enable_user_space_msr(EXIT_REASON_FILTER)
        owner_saw = []

        @m.on_msr
        def owner(ex):
            owner_saw.append(ex.index)
            from kvmgate import InjectGP
            return InjectGP

        intro, c = hook(m, commands=MSR_TOOL_COMMANDS, events=[ids.VCPU_EVENT_MSR])
        with c:
            watch(c)
            assert code(c.control_msr, 0, SYSENTER_EIP) == -ids.KVM_EPERM
            seen = []
            tool = Spawn(c.serve, on_msr=lambda ev: seen.append(ev.msr))
            r = m.run(timeout=T)
            assert owner_saw == [SYSENTER_EIP] and [f.index for f in r.gp_faults] == [SYSENTER_EIP]
            assert seen == [LSTAR]
            intro.unhook()
            tool.result()
        # after unhook the owner's filter alone again
        r = m.run(timeout=T)
        assert owner_saw == [SYSENTER_EIP] * 2 and len(r.msr_exits) == 1


def test_two_vcpus_events_only_where_enabled():
    guest = f"""{EACH_VCPU_WRITES_LSTAR}
    hlt"""
    with Machine(guest, vcpus=2) as m:
        intro, c = hook(m, commands=MSR_TOOL_COMMANDS + (ids.VM_GET_INFO,),
                        events=[ids.VCPU_EVENT_MSR])
        with c:
            assert c.get_info() == 2
            watch(c, vcpu=1)
            seen = []
            tool = Spawn(c.serve, on_msr=lambda ev: seen.append((ev.vcpu, ev.new)) or 0x7770000)
            r = m.run(timeout=T)
            assert seen == [(1, 0x20000)]
            assert m.vcpus[0].get_msrs([LSTAR])[LSTAR] == 0x10000
            assert m.vcpus[1].get_msrs([LSTAR])[LSTAR] == 0x7770000
            assert len(r.msr_exits) == 2      # one interception for the VM, answered per vCPU
            intro.unhook()
            tool.result()


# --- safety ---------------------------------------------------------------------------------

def test_tool_disconnecting_while_the_vcpu_waits_releases_it(machine):
    intro, c = hook(machine, commands=MSR_TOOL_COMMANDS, events=[ids.VCPU_EVENT_MSR])
    watch(c)
    got = []

    def tool():
        ev = c.next_event()
        got.append((ev.old, ev.new))
        wait_until(lambda: intro.server.waiting(0), what="the vCPU to wait for the reply")
        c.close()

    t = Spawn(tool)
    r = machine.run(timeout=T)
    t.result()
    assert got == [(0, FIRST)]
    assert r.regs.rbx == SECOND                 # the guest's values, both
    assert len(r.msr_exits) == 1                # interception undone at the disconnect
    assert intro.hooked and not intro.connected
    assert intro.backend.intercepted == frozenset()


@pytest.mark.parametrize("garbage", [
    p.HEADER.pack(ids.MSG_VCPU_EVENT, 0xFFFF, 1),                       # oversized
    p.pack_event_reply(999, 0, CONTINUE, ids.VCPU_EVENT_MSR, bytes(8)),  # wrong seq
    p.pack_message(ids.MSG_VCPU_EVENT, 1, b"\x01" * 16),                # bad padding/garbage
    b"\xff" * 5,                                                         # then EOF mid-header
], ids=["oversized", "wrong-seq", "garbage-reply", "truncated"])
def test_garbage_while_the_vcpu_waits_closes_and_the_guest_runs_on(machine, garbage):
    intro, c = hook(machine, commands=MSR_TOOL_COMMANDS, events=[ids.VCPU_EVENT_MSR])
    watch(c)

    def tool():
        c.next_event()
        c.sock.sendall(garbage)
        if len(garbage) < p.HEADER.size:
            c.sock.shutdown(socket.SHUT_WR)
        return c.sock.recv(100)     # EOF once the owner closed

    t = Spawn(tool)
    r = machine.run(timeout=T)
    assert t.result() == b""
    assert r.regs.rbx == SECOND and len(r.msr_exits) == 1
    assert not intro.connected and intro.server.close_reason.startswith("protocol error")
    c.close()


def test_garbage_before_any_event_closes_and_the_guest_runs(machine):
    intro, c = hook(machine, commands=MSR_TOOL_COMMANDS, events=[ids.VCPU_EVENT_MSR])
    with c:
        watch(c)
        c.sock.sendall(p.HEADER.pack(ids.VM_GET_INFO, p.MAX_MSG_SIZE + 1, 7) + os.urandom(64))
        assert c.sock.recv(100) == b""
        wait_until(lambda: not intro.connected and not intro.backend.intercepted, what="undo")
        r = machine.run(timeout=T)
    assert r.regs.rbx == SECOND and r.msr_exits == []


def test_event_timeout_releases_the_vcpu():
    with Machine(LSTAR_TWICE) as m:
        intro, c = hook(m, commands=MSR_TOOL_COMMANDS, events=[ids.VCPU_EVENT_MSR],
                        event_timeout=0.2)
        with c:
            watch(c)
            r = m.run(timeout=T)          # nobody answers
            assert r.regs.rbx == SECOND and "no reply" in intro.server.close_reason
            intro.unhook()


# --- a running guest: registers, memory, pause, unhook ---------------------------------------

def _spinning(m):
    run = Spawn(m.run, timeout=T)
    wait_until(lambda: m.read_mem(READY, 8) != bytes(8), what="the guest to start spinning")
    return run


def test_commands_while_the_guest_spins():
    with Machine(SPIN_THEN_LSTAR) as m:
        intro, c = hook(m, commands=[-1])
        with c:
            run = _spinning(m)
            regs = c.get_registers(0, [LSTAR])   # answered while the guest spins (else: timeout)
            assert regs.mode == 8 and regs.regs.rsi == FLAG and 0x10000 <= regs.regs.rip < 0x10100
            assert regs.msrs == [(LSTAR, 0)] and regs.sregs.efer & 0x500 == 0x500
            assert c.vcpu_get_info(0) > 0
            assert run.is_alive()
            c.write_physical(FLAG, (0x55550000).to_bytes(8, "little"))
            r = run.result()
            assert r.regs.rbx == 0x55550000


def test_unhook_while_the_guest_runs_undoes_interception():
    with Machine(SPIN_THEN_LSTAR) as m:
        intro, c = hook(m, commands=MSR_TOOL_COMMANDS + (ids.VM_CONTROL_EVENTS,),
                        events=[-1])
        with c:
            watch(c)
            c.control_events(ids.VM_EVENT_UNHOOK, True)
            run = _spinning(m)
            unhook = Spawn(intro.unhook, wait=2.0)
            ev = c.next_event()
            assert ev.event == ids.VM_EVENT_UNHOOK and ev.vcpu is None
            c.close()                                  # the tool leaves
            assert unhook.result() is True
            assert intro.backend.intercepted == frozenset() and not intro.hooked
            m.memory[FLAG:FLAG + 8] = (0x66660000).to_bytes(8, "little")
            r = run.result()
        assert r.regs.rbx == 0x66660000 and r.msr_exits == []


def test_pause_vcpu():
    with Machine(SPIN_THEN_LSTAR) as m:
        intro, c = hook(m, commands=[-1], events=[ids.VCPU_EVENT_PAUSE])
        threads = []
        real_state = intro.backend.state
        intro.backend.state = lambda vid, msrs=None: threads.append(
            threading.current_thread().name) or real_state(vid, msrs)
        with c:
            run = _spinning(m)
            c.pause_vcpu(0, wait=True)
            ev = c.next_event()
            assert ev.event == ids.VCPU_EVENT_PAUSE and ev.vcpu == 0
            assert ev.state.mode == 8 and ev.regs.rsi == FLAG
            # the vCPU is paused: registers are stable, memory writes land before it resumes
            rip = c.get_registers(0).regs.rip
            assert rip == ev.regs.rip
            c.write_physical(FLAG, (0x77770000).to_bytes(8, "little"))
            ev.reply(CONTINUE)
            r = run.result()
        assert r.regs.rbx == 0x77770000 and intro.backend.pause_events == 1
        # the paused vCPU's own thread sends it (vCPU 0: the run's caller)
        assert threads == ["test-spawn"]


def test_pause_crash_stops_the_vm():
    with Machine(SPIN_THEN_LSTAR) as m:
        intro, c = hook(m, commands=[-1], events=[ids.VCPU_EVENT_PAUSE])
        with c:
            run = _spinning(m)
            c.pause_vcpu(0)
            ev = c.next_event()
            ev.reply(CRASH)
            with pytest.raises(IntrospectionCrash) as ei:
                run.result()
            assert ei.value.event == ids.VCPU_EVENT_PAUSE
            intro.unhook()


def test_pause_of_a_vm_that_is_not_running(machine):
    intro, c = hook(machine, commands=[-1], events=[-1])
    with c:
        c.pause_vcpu(0, wait=True)
        ev = c.next_event()
        assert ev.event == ids.VCPU_EVENT_PAUSE
        watch(c)                            # commands are answered while the event waits
        ev.reply(CRASH)                     # nothing runs: recorded only
        wait_until(lambda: intro.backend.crashes and not intro.pending_pauses(0))
        assert intro.backend.pause_events == 1
        seen = []
        tool = Spawn(c.serve, on_msr=lambda ev: seen.append(ev.new))
        r = machine.run(timeout=T)          # the VM runs normally afterwards
        assert seen == [FIRST, SECOND] and r.regs.rbx == SECOND
        intro.unhook()
        tool.result()


# --- the unix socket ------------------------------------------------------------------------

@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="kvmgate-intro-")
    os.chmod(d, 0o755)               # reachable for the other-uid peer
    yield d
    shutil.rmtree(d, ignore_errors=True)


def connect_as(uid, path):
    """Connect from a forked child running as `uid`; what it saw: 'connect:ERRNO', 'recv:N'."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                    # child: no Python-level locks, just syscalls
        msg = "error"
        try:
            os.close(r)
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(3)
            try:
                s.connect(path)
            except OSError as e:
                msg = f"connect:{e.errno}"
            else:
                try:
                    msg = f"recv:{len(s.recv(100))}"
                except socket.timeout:
                    msg = "timeout"
                except OSError as e:
                    msg = f"recv-error:{e.errno}"
        finally:
            os.write(w, msg.encode())
            os._exit(0)
    os.close(w)
    try:
        _, status = os.waitpid(pid, 0)
        return os.read(r, 100).decode()
    finally:
        os.close(r)


def test_unix_socket_mode_peer_uid_and_cleanup(sockdir):
    path = os.path.join(sockdir, "vm.sock")
    with Machine("hlt") as m:
        h = serve_introspection(m, f"unix:{path}", [], [])
        try:
            st = os.stat(path)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            # the file mode alone keeps another uid out
            assert connect_as(65534, path) == f"connect:{errno.EACCES}"
            # with the mode opened up, SO_PEERCRED still refuses it
            os.chmod(path, 0o666)
            assert connect_as(65534, path) in ("recv:0", f"recv-error:{errno.ECONNRESET}")
            assert h.refused and h.refused[-1][0].uid == 65534 and not h.intro.hooked
            # our uid is hooked
            c = Client.connect(path, timeout=T)
            with c:
                assert c.get_version().version == 1
                assert h.intro.connected and h.hooked[-1].uid == os.geteuid()
        finally:
            h.close()
        assert not os.path.exists(path) and not h.intro.hooked


def test_listener_refuses_by_peer_credentials(sockdir, monkeypatch):
    path = os.path.join(sockdir, "vm.sock")
    monkeypatch.setattr(listener_mod, "peer_credentials",
                        lambda s: listener_mod.Peer(4242, os.geteuid() + 1000, 0))
    with Machine("hlt") as m, serve_introspection(m, f"unix:{path}", [], []) as h:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(T)
        with s:
            s.connect(path)
            assert s.recv(100) == b""
        assert h.refused[0][0].pid == 4242 and not h.intro.hooked


def test_listener_allow_lists_second_tool_and_rehook(sockdir):
    path = os.path.join(sockdir, "vm.sock")
    with Machine(LSTAR_TWICE) as m, \
            serve_introspection(m, f"unix:{path}", ["VCPU_CONTROL_MSR,vcpu_control_events", "8"],
                                ["msr"]) as h:
        c1 = Client.connect(path, timeout=T)
        with c1:
            assert c1.get_info() == 1                     # 8 = VM_GET_INFO
            assert c1.check_event(ids.VCPU_EVENT_MSR) and not c1.check_event(ids.VCPU_EVENT_PAUSE)
            watch(c1)
            c2 = Client.connect(path, timeout=T)          # a second tool is refused
            with c2:
                assert c2.sock.recv(100) == b""
            assert h.refused[-1][1] == "a tool is already hooked"
            tool = Spawn(c1.serve, on_msr=lambda ev: None)
            r = m.run(timeout=T)
            assert r.regs.rbx == SECOND and h.intro.backend.msr_events == 2
            c1.sock.shutdown(socket.SHUT_RDWR)            # the tool leaves
            assert tool.result() == "eof"
        wait_until(lambda: not h.intro.connected, what="tool gone")
        c3 = Client.connect(path, timeout=T)              # the next tool gets a fresh hook
        with c3:
            assert c3.get_info() == 1
            assert h.intro.server.controlled_msrs(0) == frozenset()
        assert len(h.hooked) == 2


def test_listener_path_handling(sockdir):
    with Machine("hlt") as m:
        with pytest.raises(UserError):
            serve_introspection(m, "tcp:1234", [], [])
        with pytest.raises(UserError):
            serve_introspection(m, "unix:", [], [])
        with pytest.raises(UserError, match="unknown command"):
            serve_introspection(m, f"unix:{sockdir}/a", ["VCPU_CONTROL_MRS"], [])
        with pytest.raises(UserError, match="unknown event"):
            serve_introspection(m, f"unix:{sockdir}/a", [], ["42"])
        plain = os.path.join(sockdir, "file")
        Path(plain).write_text("x")
        with pytest.raises(UserError, match="not a socket"):
            serve_introspection(m, f"unix:{plain}", [], [])
        with pytest.raises(UserError):
            serve_introspection(m, f"unix:{sockdir}/missing-dir/s", [], [])
        # a stale socket (nobody listening) is replaced; a live one is not
        stale = os.path.join(sockdir, "stale.sock")
        s = socket.socket(socket.AF_UNIX)
        s.bind(stale)
        s.close()
        with serve_introspection(m, f"unix:{stale}", [], []):
            with pytest.raises(UserError, match="in use"):
                serve_introspection(m, f"unix:{stale}", [], [])
        assert not os.path.exists(stale)


def test_parse_ids():
    from kvmgate.introspection.listener import parse_ids
    assert parse_ids(["VCPU_CONTROL_MSR,kvmi_vm_get_info", "0x19", " "], "command") == [25, 8]
    assert parse_ids(["VM_GET_INFO", "all"], "command") == [-1]
    assert parse_ids(["ALL"], "event") == [-1]
    assert parse_ids(["msr", "VCPU_EVENT_PAUSE", "vm_event_unhook", "0"], "event") == [15, 1, 0]
    assert parse_ids(None, "event") == []
    with pytest.raises(UserError, match="did you mean VCPU_CONTROL_MSR"):
        parse_ids(["VCPU_CONTROL_MRS"], "command")
    with pytest.raises(UserError):
        parse_ids(["22"], "command")
    with pytest.raises(UserError):
        parse_ids(["VM_EVENT_MSR"], "event")


# --- the CLI tool ---------------------------------------------------------------------------

def _cli(*args, timeout=HANG):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "kvmgate", "introspect", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("deny", [False, True])
def test_cli_watch_msr(sockdir, deny):
    path = os.path.join(sockdir, "vm.sock")
    with Machine(LSTAR_TWICE) as m, \
            serve_introspection(m, f"unix:{path}", ["VM_GET_INFO,VCPU_CONTROL_EVENTS",
                                                    "VCPU_CONTROL_MSR"], ["MSR", "UNHOOK"]) as h:
        proc = _cli(f"unix:{path}", "watch-msr", "LSTAR", "--json", "--count", "2",
                    *(["--deny"] if deny else []))
        try:
            wait_until(lambda: h.intro.connected and h.intro.msr_wanted(0, LSTAR), T * 2,
                       "the tool's setup")
            r = m.run(timeout=T)
            out, err = proc.communicate(timeout=T)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [(e["vcpu"], e["name"], e["old"], e["new"]) for e in events] == [
        (0, "IA32_LSTAR", "0x0", hex(FIRST)),
        (0, "IA32_LSTAR", "0x0" if deny else hex(FIRST), hex(SECOND))]
    assert {e["action"] for e in events} == {"revert" if deny else "allow"}
    assert r.regs.rbx == (0 if deny else SECOND)


def test_cli_watch_msr_text_until_unhook(sockdir):
    path = os.path.join(sockdir, "vm.sock")
    with Machine(LSTAR_TWICE) as m:
        h = serve_introspection(m, f"unix:{path}", ["all"], ["all"])
        proc = _cli(f"unix:{path}", "watch-msr", "0xc0000082", "--deny")
        try:
            wait_until(lambda: h.intro.msr_wanted(0, LSTAR), T * 2, "the tool's setup")
            r = m.run(timeout=T)
        finally:
            h.close()                                 # UNHOOK event: the tool exits
            out, err = proc.communicate(timeout=T)
    assert proc.returncode == 0, err
    assert out.splitlines() == [
        f"vcpu 0 IA32_LSTAR (0xc0000082): 0x0 -> {FIRST:#x}  reverted to 0x0",
        f"vcpu 0 IA32_LSTAR (0xc0000082): 0x0 -> {SECOND:#x}  reverted to 0x0"]
    assert "unhook" in err and r.regs.rbx == 0


def test_cli_watch_msr_without_permission(sockdir):
    path = os.path.join(sockdir, "vm.sock")
    with Machine("hlt") as m, serve_introspection(m, f"unix:{path}", ["VCPU_CONTROL_EVENTS"],
                                                  ["MSR"]):
        proc = _cli(f"unix:{path}", "watch-msr", "LSTAR")
        out, err = proc.communicate(timeout=HANG)
    assert proc.returncode == 1
    assert "VCPU_CONTROL_MSR: KVM_EPERM" in err and "Traceback" not in err


def test_cli_user_errors(sockdir):
    for args in (["tcp:x", "watch-msr", "LSTAR"],
                 [f"unix:{sockdir}/nothing", "watch-msr", "LSTAR"],
                 [f"unix:{sockdir}/nothing", "watch-msr", "NOT_AN_MSR"],
                 [f"unix:{sockdir}/nothing"]):
        proc = _cli(*args)
        out, err = proc.communicate(timeout=HANG)
        assert proc.returncode == 2, (args, err)
        assert "Traceback" not in err


def test_register_adds_the_subcommand():
    import argparse
    from kvmgate.cli.introspect import add_run_arguments, register
    ap = argparse.ArgumentParser()
    register(ap.add_subparsers(dest="cmd"))
    a = ap.parse_args(["introspect", "unix:/x", "watch-msr", "LSTAR", "SYSENTER_EIP", "--deny"])
    assert a.msrs == ["LSTAR", "SYSENTER_EIP"] and a.deny and callable(a.fn)
    rp = argparse.ArgumentParser()
    rp.add_argument("guest")
    add_run_arguments(rp)
    a = rp.parse_args(["--introspect", "unix:/x", "--allow-commands", "VCPU_CONTROL_MSR",
                       "--allow-commands", "VM_GET_INFO", "g.S", "--allow-events", "MSR"])
    assert (a.guest, a.introspect, a.allow_commands, a.allow_events) == \
        ("g.S", "unix:/x", ["VCPU_CONTROL_MSR", "VM_GET_INFO"], ["MSR"])


# --- the benchmark --------------------------------------------------------------------------

def test_bench_events_smoke():
    from kvmgate.bench.introspect import bench_events
    r = bench_events(n=100, rounds=1)
    assert r["events"] == {"event": 100, "event_py": 100, "event_v7": 100, "event_sleep": 100,
                           "quiet": 0}
    assert r["exits"] == {"exit": 100, "event": 100, "event_py": 100, "event_v7": 100,
                          "event_sleep": 100, "quiet": 100}
    assert r["rounds"] == 1 and len(r["loadavg"]) == 3


def test_listen_backlog_takes_a_burst_of_connects(sockdir):
    """50 tools connect at once: every connect succeeds (none refused by a full backlog), one
    is hooked and the others are refused one by one, each seeing EOF."""
    path = os.path.join(sockdir, "vm.sock")
    with Machine("hlt") as m, serve_introspection(m, f"unix:{path}") as h:
        socks = []
        try:
            for _ in range(50):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                socks.append(s)
                s.setblocking(False)
                s.connect(path)              # BlockingIOError/ConnectionRefused if the backlog is full
                s.setblocking(True)
                s.settimeout(T)
            eof = sum(1 for s in socks if _eof_or_open(s))
        finally:
            for s in socks:
                s.close()
        assert eof == 49 and len(h.hooked) == 1 and len(h.refused) == 49


def _eof_or_open(s: socket.socket) -> bool:
    """True if the listener closed this connection (refused), False if it stays open (hooked)."""
    try:
        s.sendall(p.pack_message(ids.GET_VERSION, 1))
        return s.recv(64) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
