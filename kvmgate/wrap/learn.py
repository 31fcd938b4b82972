"""`kvmgate wrap --learn OUT.toml`: every MSR access a real QEMU VM made, and the minimal
policy that lets it run (the renderer of `kvmgate learn`).

Two sources, merged in time order:
- the kernel's kvm:kvm_msr tracepoint for QEMU's process (all threads, tracefs; the recording
  starts while the shim holds KVM_CREATE_VM, so no access is missed): everything KVM handles;
- the shim's records of the exits QEMU answers itself (e.g. MSR_CORE_THREAD_COUNT, 0x35),
  which the tracepoint never sees: their outcome is read from kvm_run when QEMU re-enters.
The VM runs without a policy while learning (allow-all), so the guest is not disturbed.
"""
from __future__ import annotations

import time

import numpy as np

from ..learn.access import accesses_from_summary
from ..learn.record import merge_recordings
from ..learn.render import render_policy, write_policy
from ..trace import Recording


class _ShimEvents:
    """The shim's records as the trace columns `learn.record.merge_recordings` takes."""

    def __init__(self):
        self.rows: list[tuple[int, bool, int, bool, int]] = []
        self.offset = time.time_ns() - time.monotonic_ns()   # CLOCK_REALTIME -> the trace's mono

    @property
    def events(self) -> int:
        return len(self.rows)

    def add(self, realtime_ns: int, index: int, write: bool, value: int, gp: bool) -> None:
        self.rows.append((index, write, value, gp, realtime_ns - self.offset))

    def columns(self) -> dict:
        idx, wr, val, exc, t = zip(*self.rows)
        return {"index": np.array(idx, np.uint32), "write": np.array(wr, bool),
                "value": np.array(val, np.uint64), "exception": np.array(exc, bool),
                "pid": np.zeros(len(idx), np.int32), "time_ns": np.array(t, np.uint64)}


class WrapLearner:
    def __init__(self, out: str):
        self.out = out
        self.shim = _ShimEvents()
        self.rec: Recording | None = None

    def start(self, pid: int) -> None:
        """Record QEMU's kvm:kvm_msr events (TracefsError/OSError if tracing is unavailable)."""
        self.rec = Recording(pid=pid).start()

    def add(self, realtime_ns: int, index: int, write: bool, value: int, gp: bool) -> None:
        self.shim.add(realtime_ns, index, write, value, gp)

    def finish(self, name: str) -> tuple[int, int]:
        """Stop recording, write the policy; (MSR/direction pairs seen, pairs allowed)."""
        trace = None
        if self.rec is not None:
            self.rec.__exit__(None, None, None)        # stop and drain (the `with` exit)
            trace = self.rec.trace
        merged = merge_recordings(trace, self.shim if self.shim.events else None)
        accesses = accesses_from_summary(merged.summary())
        origin = ("Learned by `kvmgate wrap --learn` from a QEMU VM (kvm:kvm_msr events of its "
                  f"threads + {self.shim.events} MSR exits QEMU answered itself)")
        text = render_policy(accesses.values(), name=name, header=[origin])
        write_policy(text, self.out)
        return len(accesses), sum(1 for a in accesses.values() if a.allowed)
