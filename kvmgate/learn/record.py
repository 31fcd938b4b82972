"""The two recorders of every MSR access a guest makes (the kernel's kvm:kvm_msr tracepoint,
or user-space exits carried out with host-initiated KVM_GET/SET_MSRS), the merge of what they
recorded into one Trace, and the guest-initiated re-check of forwarded accesses."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np

from ..errors import InjectGP, KvmError
from ..msr import bitmaps
from ..msr.model import (DEFAULT_ALLOW, DEFAULT_DENY, EXIT_REASON_FILTER, EXIT_REASON_INVAL,
                         EXIT_REASON_UNKNOWN, READ, WRITE, KernelMsr, MsrFilter, MsrRange, windows)
from ..probe import Access, MsrProber
from ..trace import Recording, Trace, TracefsError, concat
from .access import LearnedAccess

# MSRs KVM may let a VMX/SVM guest access without an exit (so without a kvm_msr event):
# msr.bitmaps' default lists and SPEC_CTRL, plus what it leaves to configuration: XFD/XFD_ERR,
# CET, APERF/MPERF and C-state residency (KVM_X86_DISABLE_EXITS_*), mediated-PMU counters.
GUARDED_MSRS: tuple[int, ...] = tuple(sorted(
    {m for m, _ in (*bitmaps.DEFAULT_VMX_PASSTHROUGH, *bitmaps.DEFAULT_SVM_PASSTHROUGH,
                    *bitmaps.SPEC_CTRL_PASSTHROUGH)}
    | {0x1C4, 0x1C5}                                            # IA32_XFD, IA32_XFD_ERR
    | set(range(0x6A0, 0x6A9))                                  # CET: U_CET .. INT_SSP_TAB
    | {0xE7, 0xE8} | {0x3F8, 0x3F9, 0x3FA, 0x3FC, 0x3FD, 0x3FE}  # MPERF, APERF, C-states
    | set(range(0xC1, 0xC9)) | set(range(0x186, 0x18E)) | set(range(0x4C1, 0x4C9))
    | {0x309, 0x30A, 0x30B, 0x38D, 0x38E, 0x38F, 0x390}         # Intel PMU
    | set(range(0xC0010000, 0xC0010008)) | set(range(0xC0010200, 0xC001020C))
    | {0xC0000300, 0xC0000301, 0xC0000302}))                    # AMD PMU


def guard_filter() -> MsrFilter:
    points = list(GUARDED_MSRS)
    guarded = set(points)
    ranges = [MsrRange.from_bits(READ | WRITE, lo, [i not in guarded for i in range(lo, hi + 1)])
              for lo, hi in windows(points)]
    flt = MsrFilter(ranges, DEFAULT_ALLOW)
    flt.validate()
    return flt


DENY_ALL = MsrFilter([MsrRange(READ | WRITE, 0, 1, b"\x00")], DEFAULT_DENY)


def hardware_passthrough() -> bool:
    """Could KVM let the guest touch MSRs without exiting?  Not on kvm_pvm hosts (every access
    traps); yes with kvm_intel / kvm_amd, and assumed yes when unsure."""
    mods = Path("/sys/module")
    if (mods / "kvm_pvm").exists():
        return (mods / "kvm_intel").exists() or (mods / "kvm_amd").exists()
    return True


class _Forwarder:
    """MSR exit handler: a FILTER exit is carried out with host-initiated KVM_GET/SET_MSRS; an
    INVAL/UNKNOWN exit (an unfilterable x2APIC MSR KVM failed) gets #GP.  Records every one."""

    def __init__(self, machine):
        self.machine = machine
        self.events: list[tuple] = []   # (time_ns, tid, index, write, value, exception)
        self.keys: set[tuple[int, bool]] = set()

    def __call__(self, ex):
        t, tid = time.monotonic_ns(), threading.get_native_id()
        if ex.reason != EXIT_REASON_FILTER:
            self.events.append((t, tid, ex.index, bool(ex.is_write), ex.data, True))
            return InjectGP
        self.keys.add((ex.index, bool(ex.is_write)))
        try:
            done = ex.host_access()
        except KvmError:
            done = None
        value = done if done is not None else (ex.data if ex.is_write else 0)
        self.events.append((t, tid, ex.index, bool(ex.is_write), value, done is None))
        if done is None:
            return InjectGP
        return None if ex.is_write else value

    def columns(self) -> dict:
        ev = self.events
        return {"time_ns": np.array([e[0] for e in ev], np.int64),
                "pid": np.array([e[1] for e in ev], np.int32),
                "index": np.array([e[2] for e in ev], np.uint32),
                "write": np.array([e[3] for e in ev], bool),
                "value": np.array([e[4] for e in ev], np.uint64),
                "exception": np.array([e[5] for e in ev], bool)}


def _run(machine, timeout: float | None):
    """(RunResult or None, halted)."""
    try:
        return machine.run(timeout=timeout), True
    except TimeoutError:
        return None, False


class TracefsUnavailable(Exception):
    """The tracefs recording could not start; nothing has run (the cause is __cause__)."""


def record_with_tracefs(machine, timeout, guard: bool):
    """Run the machine while tracefs records this process: (Trace, forwarder or None, RunResult
    or None, halted).  With `guard`, the MSRs KVM may pass through are forwarded (GUARDED_MSRS)."""
    rec = Recording(pid=os.getpid())
    try:
        rec.start()
    except (TracefsError, OSError) as e:
        raise TracefsUnavailable(e) from e
    fwd = None
    with rec:
        if guard:
            machine.set_msr_filter(guard_filter())
            machine.enable_user_space_msr(EXIT_REASON_FILTER)
            fwd = _Forwarder(machine)
            machine.on_msr(fwd)
        result, halted = _run(machine, timeout)
    return rec.trace, fwd, result, halted


def record_with_exits(machine, timeout):
    """Run the machine with every MSR filtered and carried out from user space: (forwarder,
    RunResult or None, halted)."""
    machine.set_msr_filter(DENY_ALL)
    machine.enable_user_space_msr(EXIT_REASON_FILTER | EXIT_REASON_INVAL | EXIT_REASON_UNKNOWN)
    fwd = _Forwarder(machine)
    machine.on_msr(fwd)
    result, halted = _run(machine, timeout)
    return fwd, result, halted


def merge_recordings(trace: Trace | None, fwd: "_Forwarder | None") -> Trace:
    """The tracefs trace plus the forwarded events, in time order (one Trace)."""
    parts = [trace] if trace is not None else []
    if fwd is not None and fwd.events:
        parts.append(Trace.from_arrays(**fwd.columns()))
    meta = dict(trace.meta) if trace is not None else {"source": "exits"}
    merged = concat(parts, meta)
    if len(merged):
        order = np.argsort(merged.cols["time_ns"], kind="stable")
        merged.cols = {k: v[order] for k, v in merged.cols.items()}
    return merged


def verify_forwarded(accesses: dict[tuple[int, bool], LearnedAccess], keys: set) -> None:
    """Re-check forwarded (MSR, direction) pairs as guest accesses in a scratch VM."""
    todo = sorted((accesses[k] for k in keys if k in accesses), key=lambda a: a.first_ns)
    if not todo:
        return
    table, owner = [], []
    for a in todo:
        a.forwarded = True
        values = (a.values + a.failed_values) if a.write else (0,)
        for value in dict.fromkeys(values or (0,)):
            table.append(Access(a.index, WRITE if a.write else READ, value))
            owner.append(a)
    with MsrProber() as prober:
        kinds = prober.classify(table)
    seen: dict[int, list[KernelMsr]] = {}
    for a, k in zip(owner, kinds):
        seen.setdefault(id(a), []).append(k)
    for a in todo:
        ks = seen[id(a)]
        a.check = KernelMsr.HANDLED.value if KernelMsr.HANDLED in ks else ks[0].value
