"""The exit loop of one vCPU: KVM_RUN until HLT, a dispatch over the decoded exits.

* RDMSR / WRMSR: the gate's handler gets an `MsrExit` (the exit and its vCPU as context) and
  returns the value for a read, None to complete a write, or InjectGP; the exit answers itself
  (`reply(value)` / `fail()`, docs/kvm-msr.md, "4. Exits to user space").
* port I/O: the guest runtime's #GP and exception ports, else the machine's port handlers.
* INTERRUPTED (a kick): stop if asked, else park if asked and call the kick hooks.
* anything else ends the run with GuestError.

`run_vcpu` takes duck-typed parts, so it runs on a fake vCPU over a fake kvm_run buffer in the
unit tests: `vcpu` has run(), set_immediate_exit(), get_regs(); `gate` has `handler`;
`threads` has `stopping` and interrupted(st); `ports` maps port -> fn(machine, value).
"""
from __future__ import annotations

from .. import guest, uapi as u
from ..errors import InjectGP, KvmError
from ..exits import GpFault, GuestError, MsrExit, exception_name, exit_name
from ..vcpu_exit import Hlt, Interrupted, PortIo, Rdmsr, Wrmsr

U32, U64 = u.U32, u.U64


class LoopContext:
    """What the loop needs beyond the vCPU: the gate, the threads, port handlers, the machine
    handed to port handlers, the #GP callback and whether exits are kept."""
    __slots__ = ("gate", "threads", "ports", "machine", "on_gp", "keep_exits")

    def __init__(self, gate, threads, ports: dict, machine, on_gp=None, keep_exits=True):
        self.gate, self.threads, self.ports, self.machine = gate, threads, ports, machine
        self.on_gp, self.keep_exits = on_gp, keep_exits


def run_vcpu(st, cx: LoopContext) -> None:
    """Run vCPU `st` until HLT (return), a stop (return with threads.stopping), or an error
    (raised).  Counts every exit in st.exits, MSR exits in st.msr_count."""
    vcpu = st.vcpu
    run = vcpu.run
    gate, threads = cx.gate, cx.threads
    append = st.msr_exits.append if cx.keep_exits else None
    vid = st.index
    n = m = 0
    try:
        while True:
            ex = run()
            cls = ex.__class__
            if cls is Interrupted:
                if threads.stopping:
                    return
                vcpu.set_immediate_exit(False)
                threads.interrupted(st)
                continue
            n += 1
            if cls is Rdmsr or cls is Wrmsr:
                m += 1
                is_write = cls is Wrmsr
                rec = MsrExit(ex.index, is_write, ex.data, ex.msr_reason, vid, None, vcpu)
                if append is not None:
                    append(rec)
                handler = gate.handler
                if handler is None:
                    rec.reply = "gp"
                    ex.fail()
                    continue
                try:
                    value = handler(rec)
                except InjectGP:
                    value = InjectGP
                if value is InjectGP or (value is None and not is_write):
                    rec.reply = "gp"
                    ex.fail()
                elif is_write:
                    ex.reply()
                else:
                    ex.reply(value)
                    rec.reply = value
            elif cls is PortIo:
                port_exit(st, ex, cx)
            elif cls is Hlt:
                return
            else:
                raise unexpected_exit(st, ex)
    finally:
        st.exits = n
        st.msr_count = m


def port_exit(st, ex: PortIo, cx: LoopContext) -> None:
    port = ex.port
    if port == guest.GP_PORT:
        regs = st.vcpu.get_regs()
        fault = GpFault(regs.rax, regs.rcx & U32, st.index)
        st.gp_count += 1
        if cx.keep_exits:
            st.gp_faults.append(fault)
        if cx.on_gp is not None:
            cx.on_gp(fault)
        return
    if port == guest.EXC_PORT:
        regs = st.vcpu.get_regs()
        raise GuestError(f"vCPU {st.index}: guest took {exception_name(regs.rax)} "
                         f"(error code {regs.rbx:#x}) at RIP {regs.rcx:#x}", st.index, regs.rcx)
    handler = cx.ports.get(port)
    if ex.is_out:
        if handler is not None:
            handler(cx.machine, ex.value)
    else:
        value = handler(cx.machine, None) if handler is not None else -1
        ex.answer(int(value or 0))


def unexpected_exit(st, ex) -> GuestError:
    run, reason = ex.run, ex.reason
    detail = ""
    if reason == u.KVM_EXIT_INTERNAL_ERROR:
        detail = f" suberror {run.internal.suberror}"
    elif reason == u.KVM_EXIT_FAIL_ENTRY:
        detail = f" hardware reason {run.fail_entry.hardware_entry_failure_reason:#x}"
    elif reason == u.KVM_EXIT_MMIO:
        detail = f" at {run.mmio.phys_addr:#x} (outside guest memory)"
    try:
        rip = st.vcpu.get_regs().rip
    except KvmError:
        rip = None
    where = f" at RIP {rip:#x}" if rip is not None else ""
    return GuestError(f"vCPU {st.index}: unexpected exit {exit_name(reason)}{detail}{where}",
                      st.index, rip)
