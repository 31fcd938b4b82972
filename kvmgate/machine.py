"""Machine: a VM with one or more vCPUs running an assembled guest program, and the exit loop.

MSR exits (KVM_EXIT_X86_RDMSR/WRMSR) are answered by one handler; ports by port handlers.
`run()` never hangs: on timeout every vCPU is stopped with immediate_exit plus a signal.
"""
from __future__ import annotations

import contextlib
import ctypes as C
import errno
import functools
import mmap
import signal
import threading
import time
from typing import Callable

from . import guest, uapi as u
from .asm import assemble
from .errors import FilterError, InjectGP, KvmError
from .exits import GpFault, GuestError, Stopped, MsrExit, Regs, RunResult, VcpuResult, exception_name, exit_name
from .kvm import Kvm, ioctl
from .msr.model import (EXIT_REASON_FILTER, EXIT_REASON_VALID_MASK, MAX_NMSRS, U32, WRITE,
                        MsrFilter, deny_writes_first)

KICK_SIGNAL = signal.SIGRTMIN + 6
M64 = (1 << 64) - 1
_KVM_RUN = u.KVM_RUN
_RDMSR, _WRMSR, _IO, _HLT = u.KVM_EXIT_X86_RDMSR, u.KVM_EXIT_X86_WRMSR, u.KVM_EXIT_IO, u.KVM_EXIT_HLT


def install_kick_handler() -> bool:
    """Give KICK_SIGNAL a (no-op) Python handler so it interrupts KVM_RUN (main thread only);
    True when a handler is in place."""
    if signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, signal.SIG_IGN, None):
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(KICK_SIGNAL, lambda *_: None)
    return True


install_kick_handler()


def marshal_filter(flt: MsrFilter) -> tuple[u.kvm_msr_filter, list]:
    """struct kvm_msr_filter for `flt`, bitmaps copied into 64-bit-word buffers (the kernel
    copies ceil(nmsrs/64)*8 bytes).  Returns the struct and the buffers it points to."""
    raw = u.kvm_msr_filter(flags=flt.flags)
    keep = []
    for i, r in enumerate(flt.ranges):
        dst = raw.ranges[i]
        if not r.nmsrs:   # skipped by the kernel: pass u32 garbage through, no bitmap
            dst.flags = r.flags & U32 if isinstance(r.flags, int) else 0
            dst.base = r.base & U32 if isinstance(r.base, int) else 0
            continue
        words = (min(r.nmsrs, MAX_NMSRS + 64) + 63) // 64   # past the limit the kernel reads nothing
        buf = (C.c_uint64 * words)()
        n = min(len(r.bitmap), words * 8)
        C.memmove(buf, bytes(r.bitmap[:n]), n)
        keep.append(buf)
        dst.flags, dst.nmsrs, dst.base = r.flags, r.nmsrs, r.base
        dst.bitmap = C.addressof(buf)
    return raw, keep


class _VcpuState:
    __slots__ = ("index", "vcpu", "msr_exits", "gp_faults", "exits", "msr_count", "gp_count",
                 "ident", "alive", "error", "parked")

    def __init__(self, index: int, vcpu):
        self.index = index
        self.vcpu = vcpu
        self.ident = None
        self.alive = False
        self.parked = False
        self.reset()

    def reset(self) -> None:
        self.msr_exits = []
        self.gp_faults = []
        self.exits = 0
        self.msr_count = 0
        self.gp_count = 0
        self.error = None


class Machine:
    """A VM running `asm` (64-bit Intel syntax, or raw bytes) in long mode.

    Every vCPU starts at the program with its index in RDI and its own stack.  Handlers may be
    called from several vCPU threads at once when vcpus > 1.

    `keep_exits=True` (the default, for short runs and tests) keeps every MsrExit and GpFault of
    a run in `r.msr_exits` / `r.gp_faults`; `keep_exits=False` keeps only their counts
    (`r.msr_exit_count`, `r.gp_fault_count`), so a long run's memory stays flat.
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
        self.kvm = kvm or Kvm()
        self.vm = None
        self._mem = None
        self._states: list[_VcpuState] = []
        try:
            self.vm = self.kvm.create_vm()
            self.mem_size = mem_size
            self._mem = mmap.mmap(-1, mem_size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
            self.memory = memoryview(self._mem)
            self._mem_addr = C.addressof(C.c_char.from_buffer(self._mem))
            guest.build_image(self.memory, bytes(program))
            self.vm.set_user_memory_region(0, 0, mem_size, self._mem_addr)
            cpuid_blob = self.kvm.supported_cpuid() if cpuid else None
            for i in range(vcpus):
                vcpu = self.vm.create_vcpu(i)
                self._states.append(_VcpuState(i, vcpu))
                if cpuid_blob:
                    vcpu.set_cpuid(cpuid_blob)
        except BaseException:
            self.close()
            raise
        self._msr_handler: Callable | None = None     # what the exit loop calls
        self._owner_handler: Callable | None = None   # the owner's on_msr or policy handler
        self._intercept: tuple[frozenset, Callable] | None = None
        self._gp_handler: Callable | None = None
        self._port_handlers: dict[int, Callable] = {}
        self.exit_mask = 0                            # the owner's mask
        self.msr_filter: MsrFilter | None = None      # the owner's filter
        self._stop = False
        self._timed_out = False
        self._lock = threading.Lock()
        self._park = threading.Condition(self._lock)
        self._pause_req = False
        self._pause_gen = 0
        self._quiesce_lock = threading.RLock()   # one quiescer at a time (a swap is whole)
        self._running = False
        self._ran = False         # a run has started since construction (for wait_running)
        self.policy = None
        self.state: dict = {}     # per-VM state of higher layers (e.g. emulated MSR registers)
        self.kick_hook: Callable[[int], None] | None = None   # fn(vcpu index) after a kick

    # ---- lifecycle
    def close(self) -> None:
        """Unhook any introspection tool, stop every vCPU, close vCPU and VM fds, unmap memory."""
        intro = self.__dict__.get("introspection")
        if intro is not None:
            try:
                intro.unhook()
            except Exception:
                pass
        if self._states and getattr(self, "_running", False):
            self.stop()
            self._wait_threads_gone()
        for st in self._states:
            st.vcpu.close()
        self._states = []
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

    def _wait_threads_gone(self, timeout: float = 10.0) -> None:
        """After stop(): wait until no vCPU thread but the caller's runs, so no fd or mapping
        is closed under a thread still in KVM_RUN."""
        me = threading.get_ident()
        deadline = time.monotonic() + timeout
        with self._park:
            while any(st.alive and st.ident != me for st in self._states):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._park.wait(left)

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
        return [st.vcpu for st in self._states]

    # ---- configuration
    def on_msr(self, fn: Callable) -> Callable:
        """Register the handler for every MSR exit: fn(exit) -> value | None; raise InjectGP for #GP."""
        self._owner_handler = fn
        self._msr_handler = self._routing_handler()
        return fn

    def on_gp(self, fn: Callable) -> Callable:
        """Register fn(fault) called as each guest RDMSR/WRMSR #GP is recorded."""
        self._gp_handler = fn
        return fn

    def on_port(self, port: int, fn: Callable | None = None) -> Callable:
        """fn(machine, value) for guest OUT to `port` (its return value answers IN):
        `m.on_port(0x80, fn)`, or as a decorator `@m.on_port(0x80)`."""
        def register(fn):
            self._port_handlers[port] = fn
            return fn
        return register if fn is None else register(fn)

    def enable_user_space_msr(self, mask: int) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR): which failure reasons exit to user space."""
        if not isinstance(mask, int) or not 0 <= mask <= M64:
            raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP", self.vm, f"mask {mask!r} is not a u64")
        self.vm.enable_cap(u.KVM_CAP_X86_USER_SPACE_MSR,
                           mask | (EXIT_REASON_FILTER if self._intercept else 0))
        self.exit_mask = mask & EXIT_REASON_VALID_MASK

    def set_msr_filter(self, flt: MsrFilter | None) -> None:
        """KVM_X86_SET_MSR_FILTER; None removes filtering.  Validated first: a rejected filter
        raises FilterError with the kernel's errno and leaves the installed filter untouched."""
        new = flt if flt is not None else MsrFilter()
        new.validate()
        if self._intercept:
            new = deny_writes_first(new, self._intercept[0])
        raw, _bitmaps = marshal_filter(new)       # _bitmaps: alive until the ioctl returns
        try:
            self.vm.set_msr_filter(raw)
        except KvmError as e:
            raise FilterError(f"kernel rejected the filter: {e.strerror}", e.errno) from None
        self.msr_filter = flt

    # ---- guest memory and host-side MSR access
    def write_mem(self, gpa: int, data: bytes) -> None:
        self.memory[gpa:gpa + len(data)] = data

    def read_mem(self, gpa: int, size: int) -> bytes:
        return bytes(self.memory[gpa:gpa + size])

    def get_msrs(self, indices, vcpu: int = 0) -> dict[int, int]:
        return self._states[vcpu].vcpu.get_msrs(indices)

    def set_msrs(self, values: dict[int, int], vcpu: int = 0) -> int:
        return self._states[vcpu].vcpu.set_msrs(values)

    # ---- running
    def run(self, timeout: float | None = None) -> RunResult:
        """Run every vCPU from the program's start until all halt.  TimeoutError if not in time."""
        if (timeout is not None or len(self._states) > 1) and not install_kick_handler():
            raise RuntimeError(f"signal {KICK_SIGNAL} has no handler, so vCPUs could not be "
                               "stopped: import kvmgate from the main thread first")
        with self._lock:
            if self._running:
                raise RuntimeError("this Machine is already running")
            self._running = True
            self._ran = True
        self._stop = self._timed_out = False
        started = time.monotonic()
        timer = None
        try:
            for st in self._states:
                self._reset_vcpu(st)
            others = [threading.Thread(target=self._thread_main, args=(st,), daemon=True,
                                       name=f"kvmgate-vcpu{st.index}") for st in self._states[1:]]
            for t in others:
                t.start()
            if timeout is not None:
                timer = threading.Timer(timeout, self._timeout)
                timer.daemon = True
                timer.start()
            self._thread_main(self._states[0])
            for t in others:
                t.join()
        finally:
            if timer is not None:
                timer.cancel()
            with self._park:
                self._running = False
                self._park.notify_all()
        result = self.last_result = self._result(time.monotonic() - started)
        for st in self._states:
            if st.error is not None:
                raise st.error
        if self._timed_out:
            raise TimeoutError(f"guest did not halt within {timeout} s")
        if self._stop:
            raise Stopped("run stopped by Machine.stop() or close() before every vCPU halted")
        return result

    def _result(self, seconds: float) -> RunResult:
        """What every vCPU did in the run that just ended (also kept as `last_result`, so a run
        that ends with an exception still has its counts)."""
        out = []
        for st in self._states:
            try:
                regs = Regs(st.vcpu.get_regs())
            except KvmError:
                regs = None
            out.append(VcpuResult(st.index, regs, st.gp_faults, st.msr_exits, st.exits,
                                  st.msr_count, st.gp_count))
        return RunResult(out, seconds)

    def wait_running(self, timeout: float | None = None) -> bool:
        """Block until every vCPU thread of a run has started (True), or no run is in progress
        any more or `timeout` passed (False).  For supervisors that must know the guest runs."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._park:
            while True:
                if self._running and self._states and all(st.alive for st in self._states):
                    return True
                if not self._running and self._ran:
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._park.wait(left)

    def stop(self) -> None:
        """Ask every vCPU to stop (immediate_exit, then a signal to its thread); returns at once."""
        self._stop = True
        for st in self._states:
            self._kick_state(st)

    def set_policy(self, policy, audit=None) -> None:
        """Swap filter, exit mask and handler table atomically, also while the guest runs.

        `policy` is anything with bind(machine, audit) -> (MsrFilter, exit mask, handler, what
        to keep as `machine.policy`), e.g. a kvmgate.policy Policy or CompiledPolicy, which
        compile and validate first.  Every other vCPU is then parked outside KVM_RUN, so no
        access sees one policy's filter with the other's handlers.  A failure changes nothing."""
        flt, mask, handler, bound = policy.bind(self, audit)
        with self.quiesced():
            old = self.msr_filter
            self.set_msr_filter(flt)
            try:
                self.enable_user_space_msr(mask)
            except KvmError:
                self.set_msr_filter(old)
                raise
            self._owner_handler = handler
            self._msr_handler = self._routing_handler()
            self.policy = bound

    def intercept_msr_writes(self, msrs, callback: Callable | None) -> None:
        """Send guest WRMSRs of `msrs` to callback(exit) -> value to store (None: the guest's),
        or InjectGP; layered over the owner's filter, mask and handler, never weakening them.

        The value is stored with host-initiated KVM_SET_MSRS.  Writes the owner's filter denies
        still go to the owner's handler.  An empty set or None callback removes interception.
        Swapped atomically like set_policy; FilterError if the filter has no room left."""
        new = (frozenset(msrs), callback) if msrs and callback is not None else None
        with self.quiesced():
            old = self._intercept
            self._intercept = new
            try:
                self.set_msr_filter(self.msr_filter)
                self.enable_user_space_msr(self.exit_mask)
            except KvmError:
                self._intercept = old
                self.set_msr_filter(self.msr_filter)
                raise
            self._msr_handler = self._routing_handler()

    def _routing_handler(self) -> Callable | None:
        """The owner's handler, or, while writes are intercepted, a router in front of it."""
        owner = self._owner_handler
        if self._intercept is None:
            return owner
        msrs, callback = self._intercept
        owner_filter = self.msr_filter or MsrFilter()
        owner_mask = self.exit_mask

        def route(ex):
            if ex.reason == EXIT_REASON_FILTER:
                if ex.is_write and ex.index in msrs and owner_filter.allows(ex.index, WRITE):
                    value = callback(ex)
                    if value is InjectGP:
                        return InjectGP
                    value = ex.data if value is None else value & M64
                    stored = self._states[ex.vcpu].vcpu.host_msr_access(ex.index, True, value)
                    return InjectGP if stored is None else None
                if not owner_mask & EXIT_REASON_FILTER:
                    return InjectGP            # what KVM would have done for the owner
            return InjectGP if owner is None else owner(ex)
        return route

    @contextlib.contextmanager
    def quiesced(self, timeout: float = 10.0):
        """Hold every vCPU except the caller's outside KVM_RUN for the duration of the block.

        One quiescer at a time (a reload thread and an introspection thread may both swap): a
        vCPU thread waiting for its turn counts as parked meanwhile."""
        mine = self._current_state()
        if not self._quiesce_lock.acquire(blocking=False):
            if mine is None:
                self._quiesce_lock.acquire()
            else:
                with self.blocked(mine.index):
                    self._quiesce_lock.acquire()
        try:
            with self._pause_others(timeout):
                yield
        finally:
            self._quiesce_lock.release()

    def _current_state(self) -> _VcpuState | None:
        me = threading.get_ident()
        with self._lock:
            for st in self._states:
                if st.alive and st.ident == me:
                    return st
        return None

    @contextlib.contextmanager
    def _pause_others(self, timeout: float):
        me = threading.get_ident()
        with self._lock:
            others = [st for st in self._states if st.alive and st.ident != me]
            if not others or self._pause_req:      # none, or the caller's own pause is on
                yield
                return
            self._pause_req = True
            self._pause_gen += 1
        try:
            for st in others:
                self._kick_state(st)
            deadline = time.monotonic() + timeout
            with self._park:
                while not all(st.parked or not st.alive for st in others):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("vCPUs did not pause (a handler is blocked?)")
                    self._park.wait(left)
            yield
        finally:
            with self._park:
                self._pause_req = False
                self._park.notify_all()

    def vcpu_thread(self, index: int) -> int | None:
        """The ident of vCPU `index`'s thread while it runs, else None."""
        st = self._states[index]
        with self._lock:
            return st.ident if st.alive else None

    def fail_run(self, index: int, exc: BaseException) -> bool:
        """Stop the run so that run() raises `exc` (for vCPU `index`); False if not running."""
        st = self._states[index]
        with self._lock:
            if not st.alive:
                return False
            if st.error is None:
                st.error = exc
        self.stop()
        return True

    def kick(self, index: int) -> bool:
        """Make vCPU `index` leave KVM_RUN soon (immediate_exit, then a signal to its thread);
        its thread then calls kick_hook(index).  False if that vCPU's thread is not running."""
        return self._kick_state(self._states[index])

    def _kick_state(self, st: _VcpuState) -> bool:
        """immediate_exit, then KICK_SIGNAL to the vCPU's thread (not to the caller's own, and
        only while the thread runs: a dead thread's ident may be reused)."""
        st.vcpu.run_bytes[1] = 1
        with self._lock:
            if not st.alive or st.ident is None:
                return False
            if st.ident != threading.get_ident():
                if not install_kick_handler():
                    raise RuntimeError(f"signal {KICK_SIGNAL} has no handler: import kvmgate from "
                                       "the main thread first (its default action would kill "
                                       "the process)")
                try:
                    signal.pthread_kill(st.ident, KICK_SIGNAL)
                except (ProcessLookupError, OSError):
                    pass
            return True

    @contextlib.contextmanager
    def blocked(self, index: int):
        """Around a handler's wait on another party, on vCPU `index`'s thread: quiesced()
        counts the vCPU as parked meanwhile; leaving waits for a pause in progress to end."""
        st = self._states[index]
        with self._park:
            st.parked = True
            self._park.notify_all()
        try:
            yield
        finally:
            with self._park:
                self._await_pause_end()
                st.parked = False

    introspection_factory: Callable | None = None   # set by kvmgate.introspection on import

    @functools.cached_property
    def introspection(self):
        """The VM's introspection owner API (kvmgate.introspection.Introspection), made on
        first use: hook(sock, uuid), allow_command(id, allow), allow_event(id, allow), unhook()."""
        if Machine.introspection_factory is None:
            raise RuntimeError("import kvmgate.introspection first")
        return Machine.introspection_factory(self)

    def _parked(self, st: _VcpuState) -> None:
        with self._park:
            st.parked = True
            self._park.notify_all()
            self._await_pause_end()
            st.parked = False

    def _await_pause_end(self) -> None:
        """With _park held: wait until the pause in progress now ends (not a later one, so
        back-to-back swaps cannot starve a vCPU), or the run stops."""
        gen = self._pause_gen
        while self._pause_req and self._pause_gen == gen and not self._stop:
            self._park.wait(0.5)

    def _timeout(self) -> None:
        self._timed_out = True
        self.stop()

    def _reset_vcpu(self, st: _VcpuState) -> None:
        vcpu = st.vcpu
        vcpu.run_bytes[1] = 1          # flush any completion pending from an earlier run
        vcpu.kvm_run()
        vcpu.run_bytes[1] = 0
        sregs = vcpu.get_sregs()
        guest.long_mode_sregs(sregs)
        vcpu.set_sregs(sregs)
        regs = u.kvm_regs()
        guest.entry_regs(regs, st.index, self.mem_size)
        vcpu.set_regs(regs)
        st.reset()

    def _thread_main(self, st: _VcpuState) -> None:
        with self._park:
            st.ident = threading.get_ident()
            st.alive = True
            self._park.notify_all()
        try:
            self._loop(st)
        except BaseException as e:  # noqa: BLE001 - carried to run()'s caller
            st.error = e
            self.stop()
        finally:
            with self._park:
                st.alive = False
                self._park.notify_all()

    def _loop(self, st: _VcpuState) -> None:
        """The exit loop.  Hot path: MSR exits, read and answered through word views of kvm_run."""
        vcpu = st.vcpu
        run32, run64, runb = vcpu.run32, vcpu.run64, vcpu.run_bytes
        fd = vcpu.fd
        append = st.msr_exits.append if self.keep_exits else None
        vid = st.index
        n = m = 0
        try:
            while True:
                try:
                    ioctl(fd, _KVM_RUN, 0, vcpu)
                except KvmError as e:
                    if e.errno != errno.EINTR:
                        raise
                    if self._stop:
                        return
                    runb[1] = 0
                    if self._pause_req:
                        self._parked(st)
                    hook = self.kick_hook
                    if hook is not None:
                        hook(vid)
                    continue
                n += 1
                reason = run32[2]
                if reason == _RDMSR or reason == _WRMSR:
                    m += 1
                    is_write = reason == _WRMSR
                    ex = MsrExit(run32[11], is_write, run64[6], run32[10], vid)
                    if append is not None:
                        append(ex)
                    handler = self._msr_handler
                    if handler is None:
                        ex.reply = "gp"
                        runb[32] = 1
                        continue
                    try:
                        value = handler(ex)
                    except InjectGP:
                        value = InjectGP
                    if value is InjectGP or (value is None and not is_write):
                        ex.reply = "gp"
                        runb[32] = 1
                    else:
                        if not is_write:
                            run64[6] = value & M64
                            ex.reply = value
                        runb[32] = 0
                elif reason == _IO:
                    self._port_exit(st, run32[8] >> 16)
                elif reason == _HLT:
                    return
                else:
                    raise self._unexpected_exit(st, reason)
        finally:
            st.exits = n
            st.msr_count = m

    def _port_exit(self, st: _VcpuState, port: int) -> None:
        if port == guest.GP_PORT:
            regs = st.vcpu.get_regs()
            fault = GpFault(regs.rax, regs.rcx & U32, st.index)
            st.gp_count += 1
            if self.keep_exits:
                st.gp_faults.append(fault)
            if self._gp_handler is not None:
                self._gp_handler(fault)
            return
        if port == guest.EXC_PORT:
            regs = st.vcpu.get_regs()
            raise GuestError(f"vCPU {st.index}: guest took {exception_name(regs.rax)} "
                             f"(error code {regs.rbx:#x}) at RIP {regs.rcx:#x}", st.index, regs.rcx)
        handler = self._port_handlers.get(port)
        runb = st.vcpu.run_bytes
        off, size = st.vcpu.run64[5], runb[33]      # kvm_run.io.data_offset, .size
        if runb[32] == u.KVM_EXIT_IO_OUT:          # kvm_run.io.direction
            if handler is not None:
                handler(self, int.from_bytes(runb[off:off + size], "little"))
        else:
            ones = (1 << (8 * size)) - 1
            value = handler(self, None) if handler is not None else ones
            runb[off:off + size] = (int(value or 0) & ones).to_bytes(size, "little")

    def _unexpected_exit(self, st: _VcpuState, reason: int) -> GuestError:
        run = st.vcpu.run_struct()
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
