"""The shim's counters in the shared memory (csrc/shim_abi.h struct shim_stats and struct
shim_count), read by the `kvmgate wrap` parent: per-vCPU exit counts and the decisions its vCPUs
count instead of writing a ring record.  Reading never changes them (the vCPU threads keep
adding); u64 counters are read whole on x86_64.  Pure: no ioctls, no threads."""
from __future__ import annotations

import ctypes as C
from typing import Iterator

from ..engine import result_text
from ..engine.table import KIND_NAMES
from ..msr.names import describe
from . import layout

EXIT_KINDS = ("policy", "vmm", "gp", "host", "tool")
DecisionKey = tuple[int, bool, str, str]       # (MSR, write, action, result), as AuditLog counts


def _vcpus(header, plan: dict) -> range:
    return range(min(header.vcpus, plan["max_vcpus"]))


def exit_stats(mem, plan: dict, header) -> dict[int, dict[str, int]]:
    """Per vCPU: MSR exits answered by the policy, by the VMM, #GP, carried out as KVM would,
    and `tool`: guest writes caught by the introspection tool's filter (docs/introspection.md §3,
    "When control starts").  `tool` counts writes offered to the session, not MSR events
    sent: a write that does not change the value sends none (KVMI's rule), nor does one caught
    between the shim's filter taking the MSR and the tool's VCPU_CONTROL_MSR being answered;
    the session's own count of events sent is `WrapBackend.msr_events`."""
    out = {}
    size = C.sizeof(layout.ShimStats)
    for i in _vcpus(header, plan):
        s = layout.ShimStats.from_buffer(mem, plan["stats_off"] + i * size)
        out[i] = {k: getattr(s, k) for k in EXIT_KINDS}
    return out


def shared_counts(mem, plan: dict, header) -> Iterator[tuple[DecisionKey, int]]:
    """(key, count) per used slot of the vCPUs' count tables (a key may repeat across vCPUs)."""
    size = C.sizeof(layout.ShimCount)
    slots = plan["counts_slots"]
    for i in _vcpus(header, plan):
        base = plan["counts_off"] + i * slots * size
        for j in range(slots):
            c = layout.ShimCount.from_buffer(mem, base + j * size)
            key, count = c.key, c.count
            if not key or not count:
                continue
            index, write, action, result, would = c.decode()
            yield (index, write, KIND_NAMES.get(action, f"action({action})"),
                   result_text(result, c.value, would)), count


def add_counts(rows: list[dict], counts: Iterator[tuple[DecisionKey, int]]) -> list[dict]:
    """AuditLog.summary() rows with `counts` added (new rows for keys the log has not seen),
    sorted as summary() sorts."""
    by_key = {(int(r["msr"], 16), r["access"] == "write", r["action"], r["result"]): dict(r)
              for r in rows}
    for (index, write, action, result), n in counts:
        r = by_key.get((index, write, action, result))
        if r is None:
            r = by_key[(index, write, action, result)] = {
                "msr": f"{index:#x}", "name": describe(index), "access": "write" if write else "read",
                "action": action, "result": result, "count": 0, "unlogged": 0}
        r["count"] += n
    return [by_key[k] for k in sorted(by_key)]
