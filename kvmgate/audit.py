"""Audit log: one JSON Lines record per user-space MSR decision, rate limited per MSR and
direction (token bucket) with counts of what was suppressed, and run-end counters."""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import IO

from .msr import names
from .msr.model import reason_name


class AuditLog:
    """Thread-safe: records may come from several vCPU threads at once."""

    def __init__(self, sink: str | IO | None = None, rate: float = 20.0, burst: int = 20,
                 clock=time.time):
        self._own = isinstance(sink, str)
        self._out = open(sink, "a", buffering=1) if isinstance(sink, str) else sink
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[tuple[int, bool], list] = {}   # key -> [tokens, last, suppressed]
        self.counts: Counter = Counter()      # (msr, access, action, result) -> decisions
        self.written = 0
        self.suppressed = 0
        self._lock = threading.Lock()

    def record(self, *, vcpu: int, rip: int | None, index: int, write: bool, value: int,
               reason: int, action: str, result: str, rule: str = "") -> bool:
        """Count the decision; write a record unless the MSR's rate is exceeded."""
        now = self.clock()
        key = (index, write)
        with self._lock:
            self.counts[(index, write, action, result)] += 1
            b = self._buckets.get(key)
            if b is None:
                b = self._buckets[key] = [float(self.burst), now, 0]
            b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
            b[1] = now
            if b[0] < 1:
                b[2] += 1
                self.suppressed += 1
                return False
            b[0] -= 1
            suppressed, b[2] = b[2], 0
            self.written += 1
            if self._out is None:
                return True
            rec = {"time": round(now, 6), "vcpu": vcpu, "rip": None if rip is None else f"{rip:#x}",
                   "msr": f"{index:#x}", "name": names.describe(index),
                   "access": "write" if write else "read", "value": f"{value:#x}",
                   "reason": reason_name(reason), "action": action, "result": result}
            if rule:
                rec["rule"] = rule
            if suppressed:
                rec["suppressed_before"] = suppressed
            self._out.write(json.dumps(rec) + "\n")
        return True

    def event(self, event: str, **fields) -> None:
        """A record that is no MSR decision (schema: audit `event`), e.g. kvmgate-qemu's
        "active" when the shim installed the policy; never rate limited, not counted."""
        with self._lock:
            if self._out is not None:
                self._out.write(json.dumps({"time": round(time.time(), 6), "event": event, **fields}) + "\n")

    def count(self, index: int, write: bool, action: str, result: str, n: int = 1) -> None:
        """Count `n` decisions that are not logged (they still show in the summary)."""
        with self._lock:
            self.counts[(index, write, action, result)] += n

    def summary(self) -> list[dict]:
        """Counters per MSR, direction, action and result, with how many records were suppressed."""
        with self._lock:
            pending = {k: b[2] for k, b in self._buckets.items()}
            rows = []
            for (index, write, action, result), n in sorted(self.counts.items()):
                rows.append({"msr": f"{index:#x}", "name": names.describe(index),
                             "access": "write" if write else "read", "action": action,
                             "result": result, "count": n,
                             "unlogged": pending.get((index, write), 0)})
            return rows

    def close(self) -> None:
        if self._out is not None:
            if self.suppressed:
                with self._lock:
                    for (index, write), b in self._buckets.items():
                        if b[2]:
                            self._out.write(json.dumps({"time": round(self.clock(), 6),
                                                        "msr": f"{index:#x}", "name": names.describe(index),
                                                        "access": "write" if write else "read",
                                                        "suppressed": b[2]}) + "\n")
                            b[2] = 0
            if self._own:
                self._out.close()
            else:
                self._out.flush()
            self._out = None
