"""Prometheus metrics read the run's own counters at scrape time."""
import io
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from kvmgate.audit import AuditLog
from kvmgate.metrics import Metrics
from kvmgate.msr.model import EXIT_REASON_FILTER


def _samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _deny(log: AuditLog, n: int) -> None:
    for _ in range(n):
        log.record(vcpu=0, rip=0x10000, index=0xC0000082, write=True, value=1,
                   reason=EXIT_REASON_FILTER, action="deny", result="#GP")


def test_served_counters_rise_between_scrapes():
    log = AuditLog(io.StringIO(), rate=1.0, burst=2, clock=lambda: 5.0)
    exits = {0: 0, 1: 0}
    m = Metrics(audit=log, exits=lambda: dict(exits))
    port = m.serve(0)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        key = ("kvmgate_decisions_total", (("access", "write"), ("action", "deny"), ("msr", "0xc0000082"),
                                           ("name", "IA32_LSTAR"), ("result", "#GP")))
        _deny(log, 3)
        exits[1] = 7
        first = _samples(urllib.request.urlopen(url, timeout=10).read().decode())
        _deny(log, 5)
        m.reloads.count(True)
        m.reloads.count(False)
        second = _samples(urllib.request.urlopen(url, timeout=10).read().decode())
    finally:
        m.close()
    assert first[key] == 3 and second[key] == 8
    assert first[("kvmgate_audit_records_total", ())] == 2            # burst 2, frozen clock
    assert second[("kvmgate_audit_suppressed_total", ())] == 6
    assert first[("kvmgate_exits_total", (("vcpu", "1"),))] == 7
    assert second[("kvmgate_reloads_total", (("outcome", "applied"),))] == 1
    assert second[("kvmgate_reloads_total", (("outcome", "refused"),))] == 1


def test_textfile_for_node_exporter(tmp_path):
    log = AuditLog(io.StringIO(), clock=lambda: 5.0)
    _deny(log, 4)
    m = Metrics(audit=log)
    path = tmp_path / "kvmgate.prom"
    m.write_textfile(str(path))
    s = _samples(path.read_text())
    assert s[("kvmgate_audit_records_total", ())] == 4
    assert [k for k in s if k[0] == "kvmgate_decisions_total"][0][1][1] == ("action", "deny")


def test_decisions_source_adds_counts_the_audit_has_not_seen(tmp_path):
    """`kvmgate wrap`: the audit's rows plus the shim's shared-memory counts (wrap.counters)."""
    from kvmgate.wrap.counters import add_counts
    log = AuditLog(io.StringIO(), clock=lambda: 5.0)
    _deny(log, 2)
    live = [((0xC0000082, True, "deny", "#GP"), 5), ((0x35, False, "constant", "read 0x1"), 7),
            ((0x35, False, "constant", "read 0x1"), 1)]          # the same key on two vCPUs
    m = Metrics(audit=log, decisions=lambda: add_counts(log.summary(), iter(live)))
    path = tmp_path / "kvmgate.prom"
    m.write_textfile(str(path))
    s = _samples(path.read_text())
    assert s[("kvmgate_decisions_total", (("access", "write"), ("action", "deny"), ("msr", "0xc0000082"),
                                          ("name", "IA32_LSTAR"), ("result", "#GP")))] == 7
    assert s[("kvmgate_decisions_total", (("access", "read"), ("action", "constant"), ("msr", "0x35"),
                                          ("name", "MSR_CORE_THREAD_COUNT"), ("result", "read 0x1")))] == 8
    assert s[("kvmgate_audit_records_total", ())] == 2
    assert log.summary()[0]["count"] == 2                        # the audit's own rows untouched



def test_close_writes_the_final_counts(tmp_path):
    """close(path) stops the periodic writer, then writes the run's last counts to path."""
    path = tmp_path / "kvmgate.prom"
    m = Metrics(audit=AuditLog(io.StringIO()), exits=lambda: {0: 0})
    m.write_every(str(path), 3600)               # one write now, the next in an hour
    m.reloads.count(True)
    m.reloads.count(True)
    m.close(str(path))
    final = _samples(path.read_text())
    assert final[("kvmgate_reloads_total", (("outcome", "applied"),))] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["kvmgate.prom"]
