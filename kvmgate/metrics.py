"""Prometheus metrics for a running guest (`kvmgate run` / `kvmgate wrap`), via prometheus-client.

A collector, not counters on the exit path: every scrape reads the run's own counters (the audit
log's decision counts, the vCPU exit counts, the reload counts) under their locks, so exits cost
nothing extra.  Served on a port (`serve`) or written atomically as a node_exporter textfile
(`write_textfile`, e.g. every few seconds and at the end of the run).

Metrics (all counters):
  kvmgate_decisions_total{msr,name,access,action,result}  user-space MSR decisions
  kvmgate_exits_total{vcpu}                                exits to user space per vCPU
  kvmgate_audit_records_total                              audit records written
  kvmgate_audit_suppressed_total                           records dropped by the rate limit
  kvmgate_reloads_total{outcome}                           policy reloads (applied | refused)
"""
from __future__ import annotations

import threading
from typing import Callable

from prometheus_client import CollectorRegistry, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily


class Reloads:
    """Thread-safe reload counters (the reload thread counts, scrapes read)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = {"applied": 0, "refused": 0}

    def count(self, applied: bool) -> None:
        with self._lock:
            self._counts["applied" if applied else "refused"] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class RunCollector:
    """Reads a run's counters at scrape time.  `audit` is an AuditLog (or None), `exits` a callable
    returning {vcpu: exits}, `reloads` a Reloads (or None), `decisions` a callable returning
    rows as AuditLog.summary() does (default: the audit's summary; `kvmgate wrap` adds the
    counts the shim keeps in shared memory, kvmgate.wrap.session.Wrap.decisions)."""

    def __init__(self, audit=None, exits: Callable[[], dict[int, int]] | None = None,
                 reloads: Reloads | None = None, decisions: Callable[[], list[dict]] | None = None):
        self.audit, self.exits, self.reloads = audit, exits, reloads
        self.decisions = decisions

    def collect(self):
        d = CounterMetricFamily("kvmgate_decisions", "User-space MSR decisions",
                                labels=["msr", "name", "access", "action", "result"])
        written = suppressed = 0
        rows = self.decisions() if self.decisions is not None else \
            self.audit.summary() if self.audit is not None else []
        for row in rows:
            d.add_metric([row["msr"], row["name"], row["access"], row["action"], row["result"]],
                         row["count"])
        if self.audit is not None:
            written, suppressed = self.audit.written, self.audit.suppressed
        yield d
        yield CounterMetricFamily("kvmgate_audit_records", "Audit records written", value=written)
        yield CounterMetricFamily("kvmgate_audit_suppressed", "Audit records dropped by the rate limit",
                                  value=suppressed)
        e = CounterMetricFamily("kvmgate_exits", "Exits to user space", labels=["vcpu"])
        for vcpu, n in sorted((self.exits() if self.exits else {}).items()):
            e.add_metric([str(vcpu)], n)
        yield e
        r = CounterMetricFamily("kvmgate_reloads", "Policy reloads", labels=["outcome"])
        for outcome, n in sorted((self.reloads.snapshot() if self.reloads else {}).items()):
            r.add_metric([outcome], n)
        yield r


class Metrics:
    """A registry holding one RunCollector; serve it on a port or write it as a textfile."""

    def __init__(self, audit=None, exits=None, reloads: Reloads | None = None, decisions=None):
        self.reloads = reloads if reloads is not None else Reloads()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(RunCollector(audit, exits, self.reloads, decisions))
        self._server = None
        self._writer: threading.Thread | None = None
        self._stop = threading.Event()

    def write_every(self, path: str, seconds: float) -> None:
        """Write the textfile now and then every `seconds` until close() (a daemon thread)."""
        def loop():
            while True:
                try:
                    self.write_textfile(path)
                except OSError:
                    pass                     # the next round, or close(), tries again
                if self._stop.wait(seconds):
                    return
        self._writer = threading.Thread(target=loop, name="kvmgate-metrics", daemon=True)
        self._writer.start()

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve /metrics on addr:port (port 0: any free port); returns the port."""
        self._server, thread = start_http_server(port, addr=addr, registry=self.registry)
        return self._server.server_port

    def write_textfile(self, path: str) -> None:
        """Write the metrics for node_exporter's textfile collector (atomic rename)."""
        write_to_textfile(path, self.registry)

    def close(self, final_textfile: str | None = None) -> None:
        """Stop serving and writing; then write `final_textfile` (the run's last counts) if
        given.  Last, after the periodic writer has stopped: a write of its still in progress
        would otherwise rename an older snapshot over the final one."""
        self._stop.set()
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if final_textfile:
            self.write_textfile(final_textfile)
