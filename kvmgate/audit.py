"""Audit log: one JSON Lines record per user-space MSR decision, rate limited per MSR and
direction (token bucket) with counts of what was suppressed, and run-end counters.

Every record carries `"schema": 1`.  A write that fails (a full disk, an I/O error) follows
auditd's model, chosen by `on_failure`:

* ``"stop"`` (the default): `AuditFailure` is raised from `record()`, so the MSR handler that
  asked for the record fails and the run stops (a security audit that cannot be written must
  not be lost silently);
* ``"warn"``: one warning per failing stretch through `warn` (stderr by default), the record is
  counted as unlogged, and the guest goes on.

A record is written with one `write(2)` on an `O_APPEND` descriptor; a short write is cut back
(`ftruncate`) so every complete line in the file stays valid JSON.  `reopen()` (for logrotate's
postrotate, `kvmgate run` does it on SIGUSR1) opens the path again.
"""
from __future__ import annotations

import errno
import json
import os
import sys
import threading
import time
from collections import Counter
from typing import IO, Callable

from .msr import names
from .msr.model import reason_name

SCHEMA = 1
FAILURE_MODES = ("stop", "warn")


class AuditFailure(OSError):
    """An audit record could not be written and the log's mode is "stop"."""

    def __init__(self, err: int, path: str, detail: str):
        super().__init__(err, f"audit log {path}: {detail}; guest stopped "
                              '(audit_failure = "stop")')
        self.path = path


def _stderr(message: str) -> None:
    print(f"kvmgate: warning: {message}", file=sys.stderr, flush=True)


class BulkEntry:
    """AuditLog's entry for a writer that counts, rate-limits and formats records itself (the C
    engine's audit drain, kvmgate/engine/auditsink.py: the same lines, no Python per record).
    Uses the log's lock, descriptor, counters and buckets."""

    def write_lines(self, data: bytes, lines: int) -> int:
        """`lines` complete records in one write; returns how many went out whole.  A short
        write keeps the complete lines it wrote and cuts the rest back, so the file holds what
        record() by record would have; the rest fail as record() fails (warn, or AuditFailure
        under "stop", whose `lines_written` says how many went out)."""
        with self._lock:
            if self._fd < 0:
                try:
                    ok = self._write(data.decode())
                except AuditFailure as e:
                    self.failed += lines - 1
                    e.lines_written = 0
                    raise
                if not ok:
                    self.failed += lines - 1
                    return 0
                self.written += lines
                return lines
            keep, failure = self._append(data)
            if failure is None:
                self.written += lines
                return lines
            done = data.count(b"\n", 0, keep)
            self.written += done
            self.failed += lines - done - 1
            try:
                self._failed(*failure)
            except AuditFailure as e:
                e.lines_written = done
                raise
            return done

    def add_counts(self, rows, suppressed: int = 0) -> None:
        """Such a writer's counters: rows of (index, write, action, result, decisions,
        unlogged), and the records its rate limit suppressed."""
        with self._lock:
            for index, write, action, result, n, unlogged in rows:
                key = (index, write, action, result)
                self.counts[key] += n
                if unlogged:
                    self.unlogged[key] += unlogged
            self.suppressed += suppressed

    def owe(self, index: int, write: bool, n: int) -> None:
        """Suppressed records of (index, write) such a writer did not report: close() (or the
        next record of that MSR and direction) writes them, as for its own."""
        with self._lock:
            b = self._buckets.get((index, write))
            if b is None:
                b = self._buckets[(index, write)] = [float(self.burst), self.clock(), 0]
            b[2] += n



class AuditLog(BulkEntry):
    """Thread-safe: records may come from several vCPU threads at once.

    `sink`: a path (appended to, created mode 0600 if missing), an open text stream, or None
    (count only)."""

    def __init__(self, sink: str | os.PathLike | IO | None = None, rate: float = 20.0,
                 burst: int = 20, clock=time.time, on_failure: str = "stop",
                 warn: Callable[[str], None] = _stderr):
        if on_failure not in FAILURE_MODES:
            raise ValueError(f"on_failure={on_failure!r}: one of {FAILURE_MODES}")
        self.path = os.fspath(sink) if isinstance(sink, (str, os.PathLike)) else None
        self._fd = self._open(self.path) if self.path is not None else -1
        self._out = sink if self.path is None else None
        self.rate, self.burst, self.clock = rate, burst, clock
        self.on_failure, self.warn = on_failure, warn
        self._buckets: dict[tuple[int, bool], list] = {}   # key -> [tokens, last, suppressed]
        self.counts: Counter = Counter()      # (msr, access, action, result) -> decisions
        self.unlogged: Counter = Counter()    # same key -> decisions whose record is not written
        self.written = 0
        self.suppressed = 0
        self.failed = 0                       # records lost to write failures
        self.failure: str | None = None       # the last failure, while writes keep failing
        self._lock = threading.Lock()

    @staticmethod
    def _open(path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @property
    def closed(self) -> bool:
        return self._fd < 0 and self._out is None

    def record(self, *, vcpu: int, rip: int | None, index: int, write: bool, value: int,
               reason: int, action: str, result: str, rule: str = "") -> bool:
        """Count the decision; write a record unless the MSR's rate is exceeded.  True when a
        record was written (or would be, with no sink)."""
        now = self.clock()
        key = (index, write)
        row = (index, write, action, result)
        with self._lock:
            self.counts[row] += 1
            b = self._buckets.get(key)
            if b is None:
                b = self._buckets[key] = [float(self.burst), now, 0]
            b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
            b[1] = now
            if b[0] < 1:
                b[2] += 1
                self.suppressed += 1
                self.unlogged[row] += 1
                return False
            b[0] -= 1
            suppressed, b[2] = b[2], 0
            rec = {"schema": SCHEMA, "time": round(now, 6), "vcpu": vcpu,
                   "rip": None if rip is None else f"{rip:#x}",
                   "msr": f"{index:#x}", "name": names.describe(index),
                   "access": "write" if write else "read", "value": f"{value:#x}",
                   "reason": reason_name(reason), "action": action, "result": result}
            if rule:
                rec["rule"] = rule
            if suppressed:
                rec["suppressed_before"] = suppressed
            if self._write(json.dumps(rec) + "\n"):
                self.written += 1
                return True
            b[2] += suppressed                  # still owed to the log
            self.unlogged[row] += 1
            return False

    def configure(self, rate: float, burst: int, on_failure: str) -> None:
        """New rate, burst and failure mode (a reloaded policy's); counters and buckets stay."""
        if on_failure not in FAILURE_MODES:
            raise ValueError(f"on_failure={on_failure!r}: one of {FAILURE_MODES}")
        with self._lock:
            self.rate, self.burst, self.on_failure = rate, burst, on_failure

    def event(self, event: str, **fields) -> None:
        """A record that is no MSR decision (schema: audit `event`), e.g. kvmgate-qemu's
        "active" when the shim installed the policy; never rate limited, not counted."""
        with self._lock:
            if not self.closed:
                self._write(json.dumps({"schema": SCHEMA, "time": round(self.clock(), 6), "event": event,
                                        **fields}) + "\n")

    def count(self, index: int, write: bool, action: str, result: str, n: int = 1) -> None:
        """Count `n` decisions that are not logged (they still show in the summary)."""
        with self._lock:
            self.counts[(index, write, action, result)] += n

    def summary(self) -> list[dict]:
        """Counters per MSR, direction, action and result; `unlogged`: decisions of logged
        actions whose record was not written (rate limited, or lost to a write failure)."""
        with self._lock:
            rows = []
            for (index, write, action, result), n in sorted(self.counts.items()):
                rows.append({"msr": f"{index:#x}", "name": names.describe(index),
                             "access": "write" if write else "read", "action": action,
                             "result": result, "count": n,
                             "unlogged": self.unlogged.get((index, write, action, result), 0)})
            return rows

    def reopen(self) -> None:
        """Open the log's path again (after logrotate moved it away); a no-op for streams.
        OSError if the path cannot be opened (the old descriptor is kept then)."""
        if self.path is None:
            return
        with self._lock:
            if self._fd < 0:
                return
            fd = self._open(self.path)
            old, self._fd = self._fd, fd
            os.close(old)
            self.failure = None

    def close(self) -> None:
        """Write the per-MSR suppressed counts still owed, then close (idempotent).  With
        on_failure="stop" a failed final write raises AuditFailure after closing."""
        with self._lock:
            if self.closed:
                return
            error = None
            try:
                for (index, write), b in self._buckets.items():
                    if b[2]:
                        rec = {"schema": SCHEMA, "time": round(self.clock(), 6),
                               "msr": f"{index:#x}", "name": names.describe(index),
                               "access": "write" if write else "read", "suppressed": b[2]}
                        if not self._write(json.dumps(rec) + "\n"):
                            break
                        b[2] = 0
            except AuditFailure as e:
                error = e
            finally:
                if self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1
                elif self._out is not None:
                    try:
                        self._out.flush()
                    except (OSError, ValueError):
                        pass
                    self._out = None
            if error is not None:
                raise error

    # ---- with _lock held
    def _write(self, line: str) -> bool:
        """Whole lines (one record, or BulkEntry's several), or nothing: True when written.  A
        failure raises AuditFailure ("stop") or warns once per failing stretch ("warn")."""
        if self._fd < 0:
            if self._out is None:
                return True
            try:
                self._out.write(line)
                return True
            except (OSError, ValueError) as e:
                return self._failed(getattr(e, "errno", None) or errno.EIO, str(e))
        _keep, failure = self._append(line.encode())
        return True if failure is None else self._failed(*failure)

    def _append(self, data: bytes) -> tuple[int, tuple[int, str] | None]:
        """os.write(2) of whole lines at the end of the log file: (bytes of whole lines kept,
        None) when all went out (saying "writing again" after a failing stretch), else the
        failure (errno, why) for _failed.  A short write is cut back to its last whole line
        (ftruncate); a file that cannot seek keeps what was written and counts none of it."""
        try:
            start = os.lseek(self._fd, 0, os.SEEK_END)
        except OSError:
            start = None
        try:
            n = os.write(self._fd, data)
        except OSError as e:
            return 0, (e.errno, e.strerror or str(e))
        if n == len(data):
            if self.failure is not None:
                self.failure = None
                self.warn(f"audit log {self.path}: writing again ({self.failed} records lost)")
            return n, None
        keep = data.rfind(b"\n", 0, n) + 1 if start is not None else 0
        if n and start is not None:
            try:
                os.ftruncate(self._fd, start + keep)
            except OSError:
                pass
        return keep, (errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (short write: {n} of "
                                    f"{len(data)} bytes, cut back to whole lines)")

    def _failed(self, err: int, why: str) -> bool:
        self.failed += 1
        where = self.path or "stream"
        if self.on_failure == "stop":
            raise AuditFailure(err, where, f"write failed: {why}")
        if self.failure is None:
            self.failure = why
            self.warn(f"audit log {where}: write failed: {why}; the guest goes on and records "
                      'are counted as unlogged (audit_failure = "warn")')
        return False
