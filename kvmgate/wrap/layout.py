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
                ("applied_seq", C.c_uint32), ("options", C.c_uint64), ("reserved", C.c_uint64 * 1)]


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
                ("host", C.c_uint64), ("reserved", C.c_uint64 * 4)]


def _up(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


def plan(max_vcpus: int = 64, ring_capacity: int = 2048, counts_slots: int = 512) -> dict:
    """Offsets and total size of the shared memory for `max_vcpus` rings of `ring_capacity`."""
    stats_off = _up(C.sizeof(ShimHeader))
    counts_off = _up(stats_off + max_vcpus * C.sizeof(ShimStats))
    mailbox_off = _up(counts_off + max_vcpus * counts_slots * C.sizeof(ShimCount))
    rings_off = _up(mailbox_off + C.sizeof(ShimMailbox))
    stride = _up(RING_HEADER + ring_capacity * RECORD_SIZE)
    return {"max_vcpus": max_vcpus, "ring_capacity": ring_capacity, "stats_off": stats_off,
            "counts_off": counts_off, "counts_slots": counts_slots,
            "mailbox_off": mailbox_off, "rings_off": rings_off, "ring_stride": stride,
            "total_size": rings_off + max_vcpus * stride}


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
