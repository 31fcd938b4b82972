"""Machine: a VM with one or more vCPUs running an assembled guest program (lifecycle, memory,
run).  The parts it is made of: vm.config (its configuration methods), vm.threads (vCPU
threads: kick, park, quiesce, stop), vm.gate (filter, exit mask, handlers, interceptions),
vm.loop (the exit loop), vm.control (extensions, thread controls).

`run()` never hangs: on timeout every vCPU is stopped with immediate_exit plus a signal.
"""
from __future__ import annotations

import ctypes as C
import mmap
import threading
import time
from typing import Callable

from .. import guest, uapi as u
from ..asm import assemble
from ..errors import KvmError
from ..exits import Regs, RunResult, Stopped, VcpuResult
from ..kvm import Kvm
from .config import Configuration
from .control import Extensions, VcpuControl
from .gate import MsrGate
from .loop import LoopContext, run_loop_for, run_vcpu
from .threads import KICK_SIGNAL, VcpuState, VcpuThreads, install_kick_handler


class Machine(Configuration, Extensions, VcpuControl):
    """A VM running `asm` (64-bit Intel syntax, or raw bytes) in long mode.

    Every vCPU starts at the program with its index in RDI and its own stack.  Handlers may be
    called from several vCPU threads at once when vcpus > 1.

    `keep_exits=True` (the default, for short runs and tests) keeps every MsrExit and GpFault of
    a run in `r.msr_exits` / `r.gp_faults`; `keep_exits=False` keeps only their counts
    (`r.msr_exit_count`, `r.gp_fault_count`), so a long run's memory stays flat.

    Extension points (each documented, several users at once, each removable):
    `add_kick_hook(fn)` / `remove_kick_hook(fn)`; `add_interception(msrs, fn)` -> handle with
    update()/remove(); `Machine.register_extension(name, factory, close)` for per-machine
    objects made on first use by `machine.extension(name)` (kvmgate.introspection registers
    "introspection", which is `machine.introspection`).
    """

    def __init__(self, asm: str | bytes = "hlt", *, vcpus: int = 1, mem_size: int = 4 << 20,
                 cpuid: bool = True, kvm: Kvm | None = None, keep_exits: bool = True):
        if mem_size < guest.DATA + 0x100000 + vcpus * guest.STACK_SIZE:
            raise ValueError(f"mem_size {mem_size:#x} too small")
        if not 1 <= vcpus <= 64:
            raise ValueError(f"vcpus={vcpus}: 1..64")
        program = asm if isinstance(asm, (bytes, bytearray)) else assemble(asm, guest.CODE)
        self._own_kvm = kvm is None
        self.keep_exits = keep_exits
        self.last_result: RunResult | None = None
        self._extensions = {}
        self.kvm = kvm or Kvm()
        self.vm = None
        self._mem = None
        self._threads = VcpuThreads([])
        try:
            self.vm = self.kvm.create_vm()
            self.mem_size = mem_size
            self._mem = mmap.mmap(-1, mem_size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
            self.memory = memoryview(self._mem)
            guest.build_image(self.memory, bytes(program))
            self.vm.set_user_memory_region(0, 0, mem_size,
                                           C.addressof(C.c_char.from_buffer(self._mem)))
            cpuid_blob = self.kvm.supported_cpuid() if cpuid else None
            for i in range(vcpus):
                vcpu = self.vm.create_vcpu(i)
                self._threads.states.append(VcpuState(i, vcpu))
                if cpuid_blob:
                    vcpu.set_cpuid(cpuid_blob)
        except BaseException:
            self.close()
            raise
        self.gate = MsrGate(self.vm, self._threads.quiesced)
        self._gp_handler: Callable | None = None
        self._port_handlers: dict[int, Callable] = {}
        self._timed_out = False

    # ---- lifecycle
    def close(self) -> None:
        """Close extensions (an introspection tool is unhooked), stop every vCPU and wait for
        their threads, close vCPU and VM fds, unmap memory."""
        self._close_extensions()
        threads = getattr(self, "_threads", None)
        if threads is not None and threads.states:
            if threads.running:
                threads.stop()
                threads.wait_gone()
            for st in threads.states:
                st.vcpu.close()
            threads.states.clear()
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self._mem is not None:
            self.memory.release()
            self._mem.close()
            self._mem = None
        if self._own_kvm and self.kvm is not None:
            self.kvm.close()
            self.kvm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @property
    def vcpus(self) -> list:
        return [st.vcpu for st in self._threads.states]

    def vcpu_fds(self) -> list[tuple[int, int]]:
        """(vCPU fd, address of its mapped kvm_run) per vCPU, for code outside Python that
        runs the vCPUs itself (the exit benchmark's C loop) after reset()."""
        return [(st.vcpu.fd, st.vcpu.run_addr) for st in self._threads.states]

    # ---- guest memory and host-side MSR access
    def write_mem(self, gpa: int, data: bytes) -> None:
        self.memory[gpa:gpa + len(data)] = data

    def read_mem(self, gpa: int, size: int) -> bytes:
        return bytes(self.memory[gpa:gpa + size])

    def get_msrs(self, indices, vcpu: int = 0) -> dict[int, int]:
        return self._threads.states[vcpu].vcpu.get_msrs(indices)

    def set_msrs(self, values: dict[int, int], vcpu: int = 0) -> int:
        return self._threads.states[vcpu].vcpu.set_msrs(values)

    # ---- running
    def run(self, timeout: float | None = None) -> RunResult:
        """Run every vCPU from the program's start until all halt.  TimeoutError if not in time."""
        threads = self._threads
        if (timeout is not None or len(threads.states) > 1) and not install_kick_handler():
            raise RuntimeError(f"signal {KICK_SIGNAL} has no handler, so vCPUs could not be "
                               "stopped: import kvmgate from the main thread first")
        threads.begin()
        self._timed_out = False
        started = time.monotonic()
        timer = None
        cx = LoopContext(self.gate, threads, self._port_handlers, self, self._gp_handler,
                         self.keep_exits)
        try:
            self.reset()
            cx.run_loop = run_loop_for(self)      # vm.loop.register_run_loop (the C run loop)
            others = [threading.Thread(target=self._thread_main, args=(st, cx), daemon=True,
                                       name=f"kvmgate-vcpu{st.index}") for st in threads.states[1:]]
            for t in others:
                t.start()
            if timeout is not None:
                timer = threading.Timer(timeout, self._timeout)
                timer.daemon = True
                timer.start()
            self._thread_main(threads.states[0], cx)
            for t in others:
                t.join()
        finally:
            if timer is not None:
                timer.cancel()
                if timer.is_alive():
                    timer.join()
            if cx.run_loop is not None:
                err = cx.run_loop.finish()
                if err is not None and threads.states and not any(st.error for st in threads.states):
                    threads.states[0].error = err
            states = list(threads.states)
            result = self.last_result = self._result(time.monotonic() - started)
            threads.end()                 # close() from another thread waits for this
        for st in states:
            if st.error is not None:
                raise st.error
        if self._timed_out:
            raise TimeoutError(f"guest did not halt within {timeout} s")
        if threads.stopping:
            raise Stopped("run stopped by Machine.stop() or close() before every vCPU halted")
        return result

    def reset(self) -> None:
        """Every vCPU back to the program's start (long mode, entry registers, its stack), any
        completion pending from an earlier run flushed; the run counters cleared."""
        for st in self._threads.states:
            vcpu = st.vcpu
            vcpu.set_immediate_exit(True)     # flush any completion pending from an earlier run
            vcpu.run()
            vcpu.set_immediate_exit(False)
            sregs = vcpu.get_sregs()
            guest.long_mode_sregs(sregs)
            vcpu.set_sregs(sregs)
            regs = u.kvm_regs()
            guest.entry_regs(regs, st.index, self.mem_size)
            vcpu.set_regs(regs)
            st.reset()

    def exit_counts(self) -> dict[int, int]:
        """Exits per vCPU of the current (or last) run, readable while it runs (metrics)."""
        return {st.index: st.live_exits()[0] for st in self._threads.states}

    def _result(self, seconds: float) -> RunResult:
        """What every vCPU did in the run that just ended (also kept as `last_result`, so a run
        that ends with an exception still has its counts)."""
        out = []
        for st in self._threads.states:
            try:
                regs = Regs(st.vcpu.get_regs())
            except KvmError:
                regs = None
            out.append(VcpuResult(st.index, regs, st.gp_faults, st.msr_exits, st.exits,
                                  st.msr_count, st.gp_count))
        return RunResult(out, seconds)

    def _timeout(self) -> None:
        self._timed_out = True
        self._threads.stop()

    def _thread_main(self, st: VcpuState, cx: LoopContext) -> None:
        threads = self._threads
        threads.enter(st)
        try:
            threads.started(st)
            run_vcpu(st, cx)
        except BaseException as e:  # noqa: BLE001 - carried to run()'s caller
            st.error = e
            threads.stop()
        finally:
            threads.leave(st)
