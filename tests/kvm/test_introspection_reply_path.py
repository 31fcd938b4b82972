"""The event path on the running kernel (docs/introspection.md §3, §5): the vCPU thread reads
the tool's reply itself, registers come from kvm_run.s (KVM_CAP_SYNC_REGS) and the tool's
register writes go back through kvm_dirty_regs; an INJECT_EXCEPTION sent before run() waits
for the vCPU to run."""
import threading

import pytest

from kvmgate import Machine, uapi as u
from kvmgate.exits import GuestError
from kvmgate.introspection import ids
from kvmgate.introspection.ids import CONTINUE
from kvmgate.introspection import protocol as p
from kvmgate.introspection.vcpu_state import SYNC_MASK

from .test_introspection_kvm import (FIRST, HANG, LSTAR, LSTAR_TWICE, MSR_TOOL_COMMANDS, SECOND,
                                     SPIN_THEN_LSTAR, Spawn, hook, watch)



def _sync_supported():
    from kvmgate.kvm import Kvm
    with Kvm() as k:
        return k.check_extension(u.KVM_CAP_SYNC_REGS) & SYNC_MASK == SYNC_MASK




def test_event_registers_match_kvm_get_regs_and_sregs():
    """Both events' state blocks equal KVM_GET_REGS/KVM_GET_SREGS taken while the vCPU waits
    (GET_REGISTERS, served by the waiting vCPU's own thread); the second comes from kvm_run.s."""
    with Machine(LSTAR_TWICE) as m:
        intro, c = hook(m, commands=MSR_TOOL_COMMANDS + (ids.VCPU_GET_REGISTERS,),
                        events=[ids.VCPU_EVENT_MSR])
        with c:
            watch(c)
            seen = []

            def tool():
                for _ in range(2):
                    ev = c.next_event()
                    now = c.get_registers(0)
                    seen.append((ev.new, ev.state.regs == now.regs.pack(),
                                 ev.state.sregs == now.raw_sregs, ev.state.mode, now.mode))
                    ev.reply_msr()

            t = Spawn(tool)
            r = m.run(timeout=HANG)
            t.result()
        st = intro.backend.event_state(0)
        synced = m.vcpus[0].valid_regs() & SYNC_MASK == SYNC_MASK
    assert [s[0] for s in seen] == [FIRST, SECOND]
    assert all(s[1] and s[2] and s[3] == s[4] == 8 for s in seen), seen
    assert r.regs.rbx == SECOND
    if _sync_supported():
        assert st.ioctl_reads == 1 and synced          # KVM_GET_REGS/SREGS at the first only
    else:
        assert st.ioctl_reads == 2


def test_set_registers_with_the_reply_goes_through_dirty_regs():
    """VCPU_SET_REGISTERS at the second (synced) event: the guest continues with the tool's
    registers (r13 changed, everything else as the event showed), as KVM_GET_REGS confirms."""
    with Machine(LSTAR_TWICE) as m:
        intro, c = hook(m, commands=MSR_TOOL_COMMANDS + (ids.VCPU_SET_REGISTERS,),
                        events=[ids.VCPU_EVENT_MSR])
        with c:
            watch(c)

            def tool():
                c.next_event().reply_msr()
                ev = c.next_event()
                c.set_registers(0, p.Regs.unpack(ev.state.regs)._replace(r13=0xABCD0013))
                ev.reply_msr()

            t = Spawn(tool)
            r = m.run(timeout=HANG)
            t.result()
        assert m.vcpus[0].dirty_regs() == 0            # KVM loaded them at the next KVM_RUN
    assert r.regs.r13 == 0xABCD0013 and r.regs.rbx == SECOND


def test_inject_exception_before_run_waits_for_the_vcpu():
    """INJECT_EXCEPTION (#UD) answered 0 before run(): run() resets the vCPUs, yet the guest
    takes the exception once it runs."""
    with Machine(SPIN_THEN_LSTAR) as m:
        intro, c = hook(m, commands=[ids.VCPU_INJECT_EXCEPTION])
        with c:
            c.vcpu_request(ids.VCPU_INJECT_EXCEPTION, 0, p.INJECT_REQ.pack(6, 0, 0, 0, 0))
            with pytest.raises(GuestError) as ei:
                m.run(timeout=HANG)
    assert "#UD" in str(ei.value)


def test_two_vcpus_replies_out_of_order_and_commands_between():
    """Two vCPUs wait at once; the tool reads memory between the events, answers vCPU 1 first
    with another value, then vCPU 0: each vCPU gets its own answer."""
    guest = f"""
        mov ecx, {LSTAR:#x}
        xor edx, edx
        mov eax, edi
        shl eax, 16
        add eax, 0x10000
        wrmsr
        rdmsr
        mov rbx, rax
        hlt"""
    with Machine(guest, vcpus=2) as m:
        intro, c = hook(m, commands=MSR_TOOL_COMMANDS + (ids.VM_READ_PHYSICAL,),
                        events=[ids.VCPU_EVENT_MSR])
        with c:
            watch(c, vcpu=0)
            watch(c, vcpu=1)
            both = threading.Event()

            def tool():
                evs = {}
                while len(evs) < 2:
                    ev = c.next_event()
                    evs[ev.vcpu] = ev
                    c.read_physical(0, 16)             # a command while vCPUs wait
                both.set()
                evs[1].reply_msr(0x7771000)
                c.read_physical(0, 16)
                evs[0].reply_msr(0x7770000)

            t = Spawn(tool)
            r = m.run(timeout=HANG)
            t.result()
    assert both.is_set()
    assert [v.regs.rbx for v in r.vcpus] == [0x7770000, 0x7771000]


def test_pause_all_before_run_then_control_msr_then_reply():
    """libkvmi's order: pause every vCPU, wait for every PAUSE event, control an MSR while they
    are paused, then reply.  The vCPUs have not started, so kvmgate sends their PAUSE events
    itself: each from a thread of its own (one after the other, the second would wait forever
    for the tool's reply to the first) while no vCPU may enter KVM_RUN, and the CONTROL_MSR is
    applied under that hold."""
    guest = f"""
        test rdi, rdi
        jnz done
        mov ecx, {LSTAR:#x}
        mov edx, {FIRST >> 32:#x}
        mov eax, {FIRST & 0xFFFFFFFF:#x}
        wrmsr
        rdmsr
        mov rbx, rax
    done:
        hlt"""
    with Machine(guest, vcpus=2) as m:
        intro, c = hook(m, commands=[-1], events=[ids.VCPU_EVENT_PAUSE, ids.VCPU_EVENT_MSR])
        with c:
            c.pause_vcpu(0)
            c.pause_vcpu(1)
            order = []

            def tool():
                pauses = [c.next_event(), c.next_event()]
                order.extend(sorted((e.event, e.vcpu) for e in pauses))
                watch(c)                               # CONTROL_MSR while both are paused
                for e in pauses:
                    e.reply(CONTINUE)
                ev = c.next_event()
                order.append((ev.event, ev.vcpu, ev.new))
                ev.reply_msr(SECOND)

            t = Spawn(tool)
            r = m.run(timeout=HANG)
            t.result()
    assert order == [(ids.VCPU_EVENT_PAUSE, 0), (ids.VCPU_EVENT_PAUSE, 1),
                     (ids.VCPU_EVENT_MSR, 0, FIRST)]
    assert r.vcpus[0].regs.rbx == SECOND


def test_a_vcpu_paused_before_run_sends_its_pause_event_before_any_guest_instruction():
    """VM_PAUSE_VCPU on a vCPU whose thread does not run yet: its PAUSE event must come before
    the vCPU executes anything (KVMI's rule), even when the worker that sends the PAUSE events
    of stopped vCPUs is late.  The worker is made late here on purpose (it waits until the
    run has started), which is what a loaded machine did once: the guest then ran to HLT first
    and the tool's MSR control came too late (seen in a stress round)."""
    guest = f"""
        mov ecx, {LSTAR:#x}
        mov edx, {FIRST >> 32:#x}
        mov eax, {FIRST & 0xFFFFFFFF:#x}
        wrmsr
        hlt"""
    with Machine(guest) as m:
        m.reset()
        entry = m.vcpus[0].get_regs().rip
        intro, c = hook(m, commands=[-1], events=[ids.VCPU_EVENT_PAUSE, ids.VCPU_EVENT_MSR])
        backend = intro.backend
        late = backend._pause_parked

        def pause_parked_late(vid, ready):
            if ready is not None:
                ready.set()                  # VM_PAUSE_VCPU's reply goes out now
            m.wait_running(HANG)             # ... but the worker acts only once the run began
            late(vid, None)

        backend._pause_parked = pause_parked_late
        with c:
            c.pause_vcpu(0)
            seen = []

            def tool():
                ev = c.next_event()
                seen.append((ev.event, p.Regs.unpack(ev.state.regs).rip))
                watch(c)                     # control LSTAR while the vCPU is paused
                ev.reply(CONTINUE)
                ev = c.next_event()
                seen.append((ev.event, ev.new))
                ev.reply_msr(SECOND)

            t = Spawn(tool)
            m.run(timeout=HANG)
            t.result()
        lstar = m.vcpus[0].get_msrs([LSTAR])[LSTAR]
    assert seen == [(ids.VCPU_EVENT_PAUSE, entry), (ids.VCPU_EVENT_MSR, FIRST)]
    assert lstar == SECOND
