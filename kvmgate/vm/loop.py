"""The exit loop of one vCPU: KVM_RUN until HLT, a dispatch over the decoded exits.

* RDMSR / WRMSR: the gate's handler gets an `MsrExit` (the exit and its vCPU as context) and
  returns the value for a read, None to complete a write, or InjectGP; the exit answers itself
  (`reply(value)` / `fail()`, docs/kvm-msr.md, "4. Exits to user space").
* port I/O: the guest runtime's #GP and exception ports, else the machine's port handlers.
* INTERRUPTED (a kick): stop if asked, else park if asked and call the kick hooks.
* anything else ends the run with GuestError.

Run loops (`register_run_loop`): a registered factory may take over KVM_RUN for a run, e.g.
kvmgate.engine's C run loop (csrc/runloop.c), which answers the exits a policy bound through
the C engine decides without entering Python and returns only the exits that need Python
(handled here as below).  Exits it answered count in the vCPU's exits and MSR exits.

Live counts: every 256 exits (and on each interruption) the loop publishes
`st.live = (exits, msr exits, run loop part or None)` (see vm.threads.VcpuState.live_exits), so
metrics can read a vCPU's progress while it runs.

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


_run_loops: list = []


def register_run_loop(factory) -> None:
    """Register `factory(machine) -> run loop | None`, asked at the start of every
    Machine.run(); the first that returns a run loop runs that run's vCPUs (kvmgate.engine
    registers the C run loop on import when the C engine is built).  A run loop has:

    vcpu(st)   for each vCPU, on its thread before its first exit: an object whose run()
               replaces Vcpu.run() (returns a vcpu_exit value, INTERRUPTED for -EINTR, raises
               KvmError) and whose `answered` is the MSR exits it answered itself (read by
               other threads while it runs)
    finish()   after every vCPU stopped: an exception to raise from run(), or None
    """
    if factory not in _run_loops:
        _run_loops.append(factory)


def unregister_run_loop(factory) -> None:
    if factory in _run_loops:
        _run_loops.remove(factory)


def run_loop_for(machine):
    """The run loop of the registered factories for this run of `machine`, or None."""
    for factory in _run_loops:
        loop = factory(machine)
        if loop is not None:
            return loop
    return None


class LoopContext:
    """What the loop needs beyond the vCPU: the gate, the threads, port handlers, the machine
    handed to port handlers, the #GP callback, whether exits are kept, and a registered run
    loop (or None: Vcpu.run())."""
    __slots__ = ("gate", "threads", "ports", "machine", "on_gp", "keep_exits", "run_loop")

    def __init__(self, gate, threads, ports: dict, machine, on_gp=None, keep_exits=True,
                 run_loop=None):
        self.gate, self.threads, self.ports, self.machine = gate, threads, ports, machine
        self.on_gp, self.keep_exits, self.run_loop = on_gp, keep_exits, run_loop


def run_vcpu(st, cx: LoopContext) -> None:
    """Run vCPU `st` until HLT (return), a stop (return with threads.stopping), or an error
    (raised).  Counts every exit in st.exits, MSR exits in st.msr_count."""
    vcpu = st.vcpu
    c = cx.run_loop.vcpu(st) if cx.run_loop is not None else None
    run = vcpu.run if c is None else c.run
    gate, threads = cx.gate, cx.threads
    append = st.msr_exits.append if cx.keep_exits else None
    vid = st.index
    n = m = 0
    st.live = (0, 0, c)
    try:
        while True:
            ex = run()
            cls = ex.__class__
            if cls is Interrupted:
                st.live = (n, m, c)
                # Clear immediate_exit *before* looking at `stopping`: stop() sets `stopping`
                # first and immediate_exit second, so either this look sees the stop or the
                # stop's immediate_exit comes after the clear and the next KVM_RUN returns at
                # once.  The other order loses a stop that lands between the look and the
                # clear (its signal already spent outside KVM_RUN): the guest runs on.  A
                # SIGINT that the kernel hands to this thread wakes it at the very moment the
                # supervisor calls stop(), which is how it was found.
                vcpu.set_immediate_exit(False)
                if threads.stopping:
                    return
                threads.interrupted(st)
                continue
            n += 1
            if not n & 255:
                st.live = (n, m, c)
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
        k = c.answered if c is not None else 0
        st.exits = n + k
        st.msr_count = m + k
        st.live = (n + k, m + k, None)


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
