"""Learn a minimal deny-by-default policy from what a guest does.

    result = learn("guest.S")                  # a path, assembly text or flat-binary bytes
    result.accesses                            # one LearnedAccess per (MSR, direction)
    write_policy(result, "policy.toml")        # TOML in kvmgate's format (load_policy reads it)

The guest runs once, every MSR access is recorded with its outcome, and the policy allows exactly
the (MSR, direction) pairs the guest used successfully: consecutive MSRs with the same access
become `range` rules (a range allows everything in it, so only exact runs), the rest `msrs`
lists with names; reads and writes are kept apart.  Accesses that KVM itself answered with #GP
are not allowed (they would #GP anyway; the default deny gives the guest the same #GP and logs
it) and are listed as comments.

Recorders:

  tracefs  the kernel's kvm:kvm_msr tracepoint (kvmgate.trace, a private ftrace instance, this
           process's threads only) while the guest runs with no filter and no user-space exits:
           every access KVM completes or fails itself, exactly as it happened.  On VMX/SVM hosts
           KVM lets the guest touch a few MSRs without any exit (FS/GS/KERNEL_GS base, SYSENTER,
           SVM's STAR..SFMASK, VMX's TSC reads, SPEC_CTRL once written, ...: msr.bitmaps), which
           the tracepoint never sees; those are "guarded": denied by a filter and carried out
           from user space like the exits recorder does.  kvm_pvm hosts trap every access, so
           there nothing is guarded.
  exits    no tracing needed: a filter that denies every MSR (DEFAULT_DENY) with FILTER exits;
           each access is carried out from user space with host-initiated KVM_GET_MSRS /
           KVM_SET_MSRS and recorded.  x2APIC MSRs (0x800-0x8ff) cannot be filtered: the ones
           KVM completes are not seen (no policy can deny them either); the ones it fails exit
           (INVAL/UNKNOWN) and are recorded as KVM failures.
  auto     tracefs when a recording can start, else exits.

Host-initiated accesses are checked less strictly by KVM than the guest's own (e.g. KVM_GET_MSRS
reads IA32_ARCH_CAPABILITIES or MCG_CTL where the guest's RDMSR gets #GP), so with verify=True
(default) every (MSR, direction) carried out from user space is re-checked afterwards as a guest
access in a scratch VM (MsrProber.classify, no filter): one KVM would fail for the guest is not
allowed.  They also differ in side effects: a guest WRMSR IA32_TSC moves IA32_TSC_ADJUST, a
host-initiated one does not, so under the exits recorder the guest may read other values than it
would natively (the learned rules are the same; only the comments' values differ).
"""
from __future__ import annotations

import os
import time

import numpy as np

from ..errors import UserError
from ..guest import load_guest
from ..machine import Machine
from ..trace.sources import collect
from .access import MAX_VALUES, MIN_RUN, LearnedAccess, accesses_from_summary
from .record import (GUARDED_MSRS, TracefsUnavailable, hardware_passthrough, merge_recordings,
                     record_with_exits, record_with_tracefs, verify_forwarded)
from .render import render_policy, write_policy
from .result import LearnResult

RECORDERS = ("auto", "tracefs", "exits")


def _guest(guest) -> tuple[str | bytes, str]:
    if isinstance(guest, os.PathLike) or (isinstance(guest, str) and "\n" not in guest
                                          and os.path.isfile(guest)):
        return load_guest(guest), str(guest)
    if isinstance(guest, (bytes, bytearray)):
        return bytes(guest), "<binary>"
    if isinstance(guest, str):
        return guest, "<assembly>"
    raise TypeError(f"guest: a path, assembly text or bytes, not {type(guest).__name__}")


def learn(guest, recorder: str = "auto", timeout: float | None = 60.0, *, vcpus: int = 1,
          mem_size: int = 4 << 20, verify: bool = True, guard: bool | None = None) -> LearnResult:
    """Run `guest` once, recording every MSR access and its outcome; see the module docstring.

    `guest`: a path (str without newlines naming a file, or PathLike), assembly text, or bytes.
    `timeout`: seconds; a guest that has not halted by then is stopped and what it did until
    then is learned (`halted` is False).  `guard`: filter the MSRs KVM may pass through under
    the tracefs recorder (None: unless the host traps every access, see hardware_passthrough).
    """
    if recorder not in RECORDERS:
        raise UserError(f"recorder {recorder!r}: one of {', '.join(RECORDERS)}")
    program, label = _guest(guest)
    guard = hardware_passthrough() if guard is None else bool(guard)
    notes: list[str] = []
    trace = fwd = None
    started = time.monotonic()
    with Machine(program, vcpus=vcpus, mem_size=mem_size) as m:
        used = recorder
        if recorder in ("auto", "tracefs"):
            try:
                trace, fwd, result, halted = record_with_tracefs(m, timeout, guard)
                used = "tracefs"
            except TracefsUnavailable as e:
                cause = e.__cause__
                if recorder == "tracefs":
                    if isinstance(cause, UserError):
                        raise cause from None
                    raise UserError(f"tracefs recording cannot start: {cause}") from None
                notes.append(f"tracefs unavailable ({cause}); recorded with user-space exits")
                used = "exits"
        if used == "exits":
            fwd, result, halted = record_with_exits(m, timeout)
    seconds = result.seconds if result is not None else time.monotonic() - started
    merged = merge_recordings(trace, fwd)
    accesses = accesses_from_summary(merged.summary())
    if verify and fwd is not None:
        verify_forwarded(accesses, fwd.keys)
    gp = len(result.gp_faults) if result is not None else None
    traced_gp = int(np.count_nonzero(merged.cols["exception"]))
    if not halted:
        notes.append(f"the guest did not halt within {timeout} s: learned from what it did until then")
    if trace is not None:
        lost = trace.meta.get("lost_events", 0) + trace.meta.get("missed_pages", 0)
        if lost:
            notes.append(f"tracefs lost events ({lost}): the policy may miss accesses; record again")
    if gp is not None and gp != traced_gp:
        notes.append(f"the guest reported {gp} #GP faults but {traced_gp} failed accesses were "
                     "recorded (another VM in this process, or lost events?)")
    if used == "exits":
        notes.append("x2APIC MSRs (0x800-0x8ff) that KVM completes are not seen by this recorder; "
                     "KVM never filters them, so no policy can deny them")
    meta = {k: v for k, v in merged.meta.items() if k != "tasks"}
    return LearnResult(accesses=[accesses[k] for k in sorted(accesses)], recorder=used,
                       guest=label, halted=halted, seconds=seconds, events=len(merged),
                       gp_faults=gp, guarded=GUARDED_MSRS if used == "tracefs" and guard else (),
                       notes=notes, trace=merged, meta=meta)


def learn_from_traces(paths, *, full: bool = False, dask: str | None = None,
                      accept_partial: bool = False) -> LearnResult:
    """The minimal policy for every VM of recorded traces (files or directories, e.g. taken with
    `kvmgate trace record --pid <qemu pid>`): the union of what each used, as `learn` renders it.

    The traces are read and checked as `trace replay` reads them (kvmgate.trace.sources;
    `dask` runs the per-file work on a Dask cluster).  An unfinished recording among them is a
    UserError unless `accept_partial` (then its events count and a note says so)."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    started = time.monotonic()
    got = collect(paths, full=full, dask=dask)
    if got.partial and not accept_partial:
        raise UserError("partial trace: " + "; ".join(got.partial)
                        + " (accept what was recovered with --accept-partial)")
    accesses = accesses_from_summary(got.summary)
    hosts = got.summary.hosts
    notes = [f"partial trace: {p}" for p in got.partial]
    label = ", ".join(map(str, paths)) if len(paths) <= 3 else f"{len(paths)} trace paths"
    meta = {"files": [f.to_dict() for f in got.files], "hosts": hosts}
    return LearnResult(accesses=[accesses[k] for k in sorted(accesses)], recorder="trace",
                       guest=label, halted=True, seconds=time.monotonic() - started,
                       events=got.events, gp_faults=None, notes=notes, trace=None, meta=meta)


__all__ = ["learn", "learn_from_traces", "LearnResult", "LearnedAccess", "render_policy", "write_policy", "load_guest",
           "RECORDERS", "GUARDED_MSRS", "MAX_VALUES", "MIN_RUN", "hardware_passthrough",
           "accesses_from_summary"]
