"""A policy file against trace files: the library side of `kvmgate trace replay`.

    report, cp = replay_policy("policy.toml", ["fleet/"], by_host=True, dask="local:4")

The verdict per key comes from kvmgate.trace.policy.policy_decider (the single place replay
turns a compiled policy into verdicts).  `classify=True` asks this host's KVM, for each
(MSR, direction) the traces saw fail with #GP, whether KVM did not know the MSR (UNKNOWN) or
refused the access (INVALID), with one scratch-VM probe per pair (kvmgate.probe.MsrProber).
"""
from __future__ import annotations

import time
from typing import Callable

from ..hostinfo import ignore_msrs
from ..msr.model import READ, WRITE, KernelMsr
from ..policy import compile_policy, load_policy
from ..probe import Access, MsrProber
from .policy import policy_decider
from .replay import ReplayReport, report_from_summary
from .sources import collect
from .summary import Summary


def kernel_classifier(summary: Summary) -> Callable[[int, bool], KernelMsr | None]:
    """kernel(index, write) for the summary's #GP keys, asked of this host's KVM."""
    _, index, write, exc = (a.tolist() for a in summary.columns())
    values = summary.values_of()
    first: dict[tuple[int, bool], int] = {}
    for k in range(len(summary)):
        if exc[k] and (index[k], write[k]) not in first:
            first[(index[k], write[k])] = values[k][0] if values[k] else 0
    kinds: dict[tuple[int, bool], KernelMsr] = {}
    if first:
        keys = list(first)
        with MsrProber() as p:
            got = p.classify([Access(i, WRITE if w else READ, first[(i, w)]) for i, w in keys])
        kinds = dict(zip(keys, got))
    return lambda index, write: kinds.get((index, bool(write)))


def replay_policy(policy_path, trace_paths, *, classify: bool = False, by_host: bool = False,
                  full: bool = False, dask: str | None = None):
    """(ReplayReport, CompiledPolicy) for a policy file and trace files or directories."""
    started = time.perf_counter()
    cp = compile_policy(load_policy(policy_path), ignore_msrs())
    paths = [trace_paths] if isinstance(trace_paths, (str, bytes)) or hasattr(trace_paths, "__fspath__") \
        else list(trace_paths)
    got = collect(paths, full=full, dask=dask)
    kernel = kernel_classifier(got.summary) if classify else None
    report: ReplayReport = report_from_summary(got.summary, policy_decider(cp, kernel), by_host=by_host,
                                               files=got.files, partial=got.partial, meta=got.meta,
                                               started=started)
    return report, cp


__all__ = ["replay_policy", "kernel_classifier"]
