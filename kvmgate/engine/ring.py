"""The consumer side of the per-vCPU audit rings (struct kg_ring, csrc/engine.h).

A ring lives in caller memory shared with its producer (the shim inside a VMM, or a C vCPU run
loop): a 192-byte header (magic, version, capacity, record size; the producer's `head` and
`dropped` at offset 64; the consumer's `tail` at offset 128), then `capacity` 64-byte records.
Records decode into the keyword arguments of `AuditLog.record` (logged decisions) or
`AuditLog.count` (decisions only counted), with the result texts handlers.py writes.

Draining uses the C engine when built; otherwise plain native 8-byte loads and stores through a
memoryview, which x86-64's ordering (TSO) makes a correct single consumer."""
from __future__ import annotations

import mmap
import struct
from typing import Iterable, NamedTuple

from . import binding
from .binding import result_text
from .table import KIND_NAMES, NONE

MAGIC = 0x3152474B               # "KGR1"
VERSION = 1
HEADER_SIZE = 192
HEAD_AT, DROPPED_AT, TAIL_AT = 64, 72, 128
RECORD = struct.Struct("<QQQQIIIBBBB16x")       # struct kg_record, 64 bytes
assert RECORD.size == 64
RF_WRITE, RF_RIP, RF_LOG, RF_WOULD_DENY = 0x01, 0x02, 0x04, 0x08


class RingRecord(NamedTuple):
    """One decoded record: `fields` are AuditLog.record's keyword arguments."""
    time: float                 # CLOCK_REALTIME seconds when the decision was made
    logged: bool                # an audit record (else only counted)
    would_deny: bool            # audit mode: the policy would have given #GP
    fields: dict


def decode(raw: bytes, rules: tuple[str, ...]) -> list[RingRecord]:
    """64-byte records -> RingRecords; `rules` are the rule descriptions of the table that made
    them (EngineTable.rules)."""
    out = []
    for t, rip, data, value, index, vcpu, rule, reason, action, result, flags in \
            RECORD.iter_unpack(raw):
        would = bool(flags & RF_WOULD_DENY)
        out.append(RingRecord(t / 1e9, bool(flags & RF_LOG), would, {
            "vcpu": vcpu, "rip": rip if flags & RF_RIP else None, "index": index,
            "write": bool(flags & RF_WRITE), "value": data, "reason": reason,
            "action": KIND_NAMES.get(action, f"action({action})"),
            "result": result_text(result, value, would),
            "rule": rules[rule] if rule != NONE and rule < len(rules) else ""}))
    return out


def deliver(records: Iterable[RingRecord], audit) -> int:
    """Hand records to an AuditLog: record() for logged ones, count() for the rest."""
    n = 0
    for r in records:
        f = r.fields
        if r.logged:
            audit.record(**f)
        else:
            audit.count(f["index"], f["write"], f["action"], f["result"])
        n += 1
    return n


class Ring:
    """A per-vCPU audit ring.  Ring(capacity) makes one in a new anonymous MAP_SHARED mapping;
    Ring(buffer=...) attaches to an initialised one (its header is checked against the buffer
    size, so a corrupt producer cannot make the consumer read outside it)."""

    def __init__(self, capacity: int = 1024, buffer=None):
        if buffer is None:
            if capacity < 2 or capacity & (capacity - 1):
                raise ValueError(f"ring capacity {capacity}: a power of two >= 2")
            buffer = mmap.mmap(-1, HEADER_SIZE + capacity * RECORD.size)
            _init(buffer, capacity)
        if len(buffer) < HEADER_SIZE:
            raise ValueError("not an initialised kvmgate audit ring: shorter than its header")
        magic, version, cap, rsize = struct.unpack_from("<IIII", buffer, 0)
        if magic != MAGIC or version != VERSION or rsize != RECORD.size or cap < 2 or \
                cap & (cap - 1) or HEADER_SIZE + cap * RECORD.size > len(buffer):
            raise ValueError("not an initialised kvmgate audit ring of this size")
        self.buffer = buffer
        self._words = memoryview(buffer).cast("B")[:HEADER_SIZE].cast("Q")
        self.capacity = cap

    @property
    def dropped(self) -> int:
        """Records the producer could not push because the ring was full."""
        return self._words[DROPPED_AT // 8]

    def pending(self) -> int:
        return (self._words[HEAD_AT // 8] - self._words[TAIL_AT // 8]) & ((1 << 64) - 1)

    def drain_raw(self, limit: int | None = None) -> bytes:
        """Pop up to `limit` records (all pending by default) as raw bytes."""
        lim = self.capacity if limit is None else min(limit, self.capacity)
        if binding.available():
            return binding.native().ring_drain(self.buffer, lim)
        w = self._words
        tail, head = w[TAIL_AT // 8], w[HEAD_AT // 8]
        n = head - tail
        if n <= 0 or n > self.capacity:
            return b""
        n = min(n, lim)
        mask, out = self.capacity - 1, []
        for k in range(tail, tail + n):
            at = HEADER_SIZE + (k & mask) * RECORD.size
            out.append(bytes(self.buffer[at:at + RECORD.size]))
        w[TAIL_AT // 8] = tail + n
        return b"".join(out)

    def drain(self, rules: tuple[str, ...], limit: int | None = None) -> list[RingRecord]:
        return decode(self.drain_raw(limit), rules)

    def push(self, record: bytes) -> bool:
        """Producer side (kg_ring_push; needs the C engine): False when full (counted)."""
        return binding.native().ring_push(self.buffer, record)


def _init(buffer, capacity: int) -> None:
    if binding.available():
        binding.native().ring_init(buffer, capacity)
        return
    buffer[:HEADER_SIZE] = bytes(HEADER_SIZE)
    struct.pack_into("<IIII", buffer, 0, MAGIC, VERSION, capacity, RECORD.size)
