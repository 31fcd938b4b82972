"""The shared memory between `kvmgate wrap` and the shim inside the VMM: a ctypes mirror of
csrc/shim_abi.h (header, per-vCPU exit counters, the policy mailbox, one engine audit ring per
vCPU).  Pure: no ioctls; the memfd is created and mapped by kvmgate.wrap.session."""
from __future__ import annotations

import ctypes as C

ENV = "KVMGATE_SHIM"
MAGIC = 0x4D494853            # "SHIM"
VERSION = 1
MAX_RANGES = 16               # KVM_MSR_FILTER_MAX_RANGES
BITMAP_BYTES = 0x600          # KVM_MSR_FILTER_MAX_BITMAP_SIZE
NAME_BYTES = 256
TABLE_MAX = 1 << 20
RING_HEADER = 192             # struct kg_ring (engine.h)
RECORD_SIZE = 64              # struct kg_record
PAGE = 4096
OPT_LEARN = 1                 # SHIM_OPT_LEARN
OPT_KVMI = 2                  # SHIM_OPT_KVMI
KVMI_MAX_MSRS = 64            # SHIM_KVMI_MAX_MSRS
KVMI_REQ_MSRS = 32            # SHIM_KVMI_REQ_MSRS
KVMI_STRIDE = 4096            # SHIM_KVMI_STRIDE
KVMI_IDLE, KVMI_PARKED, KVMI_REQ, KVMI_REQ_DONE, KVMI_REPLY = range(5)
KVMI_KIND_MSR, KVMI_KIND_PAUSE = 1, 2
KVMI_REQ_GET_MSRS = 1


class ShimRange(C.Structure):
    _fields_ = [("flags", C.c_uint32), ("base", C.c_uint32), ("nmsrs", C.c_uint32),
                ("reserved", C.c_uint32), ("bitmap", C.c_uint8 * BITMAP_BYTES)]


class ShimFilter(C.Structure):
    _fields_ = [("flags", C.c_uint32), ("nranges", C.c_uint32), ("ranges", ShimRange * MAX_RANGES)]


class ShimMailbox(C.Structure):
    _fields_ = [("seq", C.c_uint32), ("exit_mask", C.c_uint32), ("table_len", C.c_uint32),
                ("reserved", C.c_uint32), ("name", C.c_char * NAME_BYTES), ("filter", ShimFilter),
                ("table", C.c_uint64 * (TABLE_MAX // 8))]


class ShimHeader(C.Structure):
    _fields_ = [("magic", C.c_uint32), ("version", C.c_uint32), ("max_vcpus", C.c_uint32),
                ("ring_capacity", C.c_uint32), ("mailbox_off", C.c_uint64),
                ("rings_off", C.c_uint64), ("ring_stride", C.c_uint64),
                ("total_size", C.c_uint64), ("stats_off", C.c_uint64), ("vcpus", C.c_uint32),
                ("shim_pid", C.c_uint32), ("counts_off", C.c_uint64), ("counts_slots", C.c_uint32),
                ("applied_seq", C.c_uint32), ("options", C.c_uint64), ("kvmi_off", C.c_uint64)]


class ShimCount(C.Structure):
    """A decision counted by its vCPU instead of a ring record (csrc/shim_abi.h)."""
    _fields_ = [("key", C.c_uint64), ("value", C.c_uint64), ("count", C.c_uint64),
                ("reserved", C.c_uint64)]

    def decode(self) -> tuple[int, bool, int, int, bool]:
        """(MSR, write, action, result, would_deny) of a used slot."""
        k = self.key
        return k >> 32, bool(k >> 24 & 1), k >> 16 & 0xFF, k >> 8 & 0xFF, bool(k >> 25 & 1)


class ShimStats(C.Structure):
    _fields_ = [("policy", C.c_uint64), ("vmm", C.c_uint64), ("gp", C.c_uint64),
                ("host", C.c_uint64), ("tool", C.c_uint64), ("reserved", C.c_uint64 * 3)]


class ShimKvmi(C.Structure):
    """The introspection tool's controlled MSRs (csrc/shim_abi.h struct shim_kvmi)."""
    _fields_ = [("seq", C.c_uint32), ("nmsrs", C.c_uint32), ("msrs", C.c_uint32 * KVMI_MAX_MSRS)]


class ShimKvmiVcpu(C.Structure):
    """One vCPU's introspection slot (csrc/shim_abi.h struct shim_kvmi_vcpu)."""
    _fields_ = [("state", C.c_uint32), ("kind", C.c_uint32), ("pause_req", C.c_uint32),
                ("action", C.c_uint32), ("msr", C.c_uint32), ("set_regs", C.c_uint32),
                ("tid", C.c_uint32), ("req", C.c_uint32), ("req_result", C.c_int32),
                ("req_nmsrs", C.c_uint32), ("old_value", C.c_uint64), ("new_value", C.c_uint64),
                ("value", C.c_uint64), ("tsc_khz", C.c_uint64), ("regs", C.c_uint8 * 144),
                ("sregs", C.c_uint8 * 312), ("state_msrs", C.c_uint64 * 9),
                ("req_msrs", C.c_uint32 * KVMI_REQ_MSRS), ("req_values", C.c_uint64 * KVMI_REQ_MSRS)]


def _up(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


def plan(max_vcpus: int = 64, ring_capacity: int = 2048, counts_slots: int = 512) -> dict:
    """Offsets and total size of the shared memory for `max_vcpus` rings of `ring_capacity`."""
    stats_off = _up(C.sizeof(ShimHeader))
    counts_off = _up(stats_off + max_vcpus * C.sizeof(ShimStats))
    mailbox_off = _up(counts_off + max_vcpus * counts_slots * C.sizeof(ShimCount))
    rings_off = _up(mailbox_off + C.sizeof(ShimMailbox))
    stride = _up(RING_HEADER + ring_capacity * RECORD_SIZE)
    kvmi_off = rings_off + max_vcpus * stride
    return {"max_vcpus": max_vcpus, "ring_capacity": ring_capacity, "stats_off": stats_off,
            "counts_off": counts_off, "counts_slots": counts_slots,
            "mailbox_off": mailbox_off, "rings_off": rings_off, "ring_stride": stride,
            "kvmi_off": kvmi_off,
            "total_size": kvmi_off + (1 + max_vcpus) * KVMI_STRIDE}


def fill_filter(dst: ShimFilter, flt) -> None:
    """A kvmgate.msr.model.MsrFilter into the mailbox's kernel-filter mirror."""
    ranges = list(flt.ranges)
    if len(ranges) > MAX_RANGES:
        raise ValueError(f"{len(ranges)} filter ranges; the kernel takes {MAX_RANGES}")
    C.memset(C.addressof(dst), 0, C.sizeof(dst))
    dst.flags = flt.flags
    dst.nranges = len(ranges)
    for i, r in enumerate(ranges):
        bm = bytes(r.bitmap)
        dst.ranges[i].flags, dst.ranges[i].base, dst.ranges[i].nmsrs = r.flags, r.base, r.nmsrs
        C.memmove(dst.ranges[i].bitmap, bm, min(len(bm), BITMAP_BYTES))
