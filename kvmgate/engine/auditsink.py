"""Audit records from the per-vCPU rings into an AuditLog, drained and formatted in C.

`sink_for(audit)` is the one `AuditSink` of an AuditLog: a struct kg_audit (csrc/auditfmt.c)
that pops ring records, counts every decision, applies the log's token bucket per MSR and
direction and formats the JSON line of each logged decision it lets through, byte for byte
as AuditLog.record() writes it (the record's `time` is its decision time, CLOCK_REALTIME,
which is also the bucket's clock), with the GIL released.  Python then hands the batch to
`AuditLog.write_lines` (one write, a short one cut back to whole lines; the log's failure mode, `stop` or `warn`, and SIGUSR1's
reopen apply as for one record) and the counters to `AuditLog.add_counts`: Python runs once per
batch and once per MSR name, never per record.

Buckets of the C drain are its own: an MSR and direction logged both here and by
AuditLog.record() (only across a swap between an EnginePolicy and a Python policy) is rate
limited by each separately.  `settle()` hands the suppressed counts no record reported to the
log (AuditLog.owe), so close() writes them."""
from __future__ import annotations

import json
import threading
import weakref

from ..msr import names
from . import binding
from .binding import result_text
from .ring import RF_WOULD_DENY, RF_WRITE
from .table import KIND_NAMES

MAX_BYTES = 1 << 18          # formatted bytes per write


class AuditSink:
    """The C drain of one AuditLog.  `lock` serialises everything (one consumer per ring)."""

    def __init__(self, audit):
        eng = binding.native()
        self.audit = audit
        self._conf = (audit.rate, audit.burst)
        self._c = eng.Audit(float(audit.rate), float(audit.burst))
        self._codes = (eng.AUDIT_EMPTY, eng.AUDIT_NAME)
        self.lock = threading.Lock()

    def drain(self, ring, rules) -> None:
        """Every record pending in `ring` (made by the table whose `rules` these are: see
        rules_for) into the log.  AuditFailure from the log's write under "stop"."""
        with self.lock:
            self.drain_locked(ring, rules)

    def drain_locked(self, ring, rules) -> None:
        audit, c = self.audit, self._c
        conf = (audit.rate, audit.burst)
        if conf != self._conf:                 # a reloaded policy's rate and burst
            c.configure(float(conf[0]), float(conf[1]))
            self._conf = conf
        empty, need_name = self._codes
        while True:
            status, missing = c.drain(ring.buffer, rules, MAX_BYTES)
            if status == need_name:
                c.set_name(missing, json.dumps(names.describe(missing)).encode())
                continue
            data, n = c.lines()
            done = 0
            try:
                done = audit.write_lines(data, n) if n else 0
            except Exception as e:
                done = getattr(e, "lines_written", 0)
                raise
            finally:
                c.commit(done)
                self._counts()
            if status == empty:
                return

    def _counts(self) -> None:
        rows, suppressed = self._c.take_rows()
        if rows or suppressed:
            self.audit.add_counts(
                [(index, bool(flags & RF_WRITE), KIND_NAMES.get(action, f"action({action})"),
                  result_text(result, value, bool(flags & RF_WOULD_DENY)), n, unlogged)
                 for index, flags, action, result, value, n, unlogged in rows], suppressed)

    def settle(self) -> None:
        """Hand the suppressed counts no written record reported to the log (end of a run)."""
        with self.lock:
            for index, write, n in self._c.take_owed():
                self.audit.owe(index, write, n)


_sinks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_rules: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def sink_for(audit) -> AuditSink:
    """The AuditSink of `audit` (made on first use, lives as long as the log)."""
    with _lock:
        s = _sinks.get(audit)
        if s is None:
            s = _sinks[audit] = AuditSink(audit)
        return s


def rules_for(table):
    """The C drain's view of an EngineTable's rule descriptions (each json.dumps()'d)."""
    with _lock:
        r = _rules.get(table)
        if r is None:
            r = _rules[table] = binding.native().Rules(
                [json.dumps(rule).encode() for rule in table.rules])
        return r
