"""The audit log's token bucket and records, with a fake clock and hand-computed expectations.

Per MSR and direction: a bucket of `burst` tokens, refilled at `rate` tokens per second of the
clock, capped at `burst`; a record costs one token; without a token the record is suppressed
and counted, and the next written record says how many were suppressed before it."""
import io
import json

from kvmgate.audit import AuditLog


class Clock:
    """A clock the test sets by hand."""

    def __init__(self, t=100.0):
        self.t = t

    def __call__(self):
        return self.t


def rec(audit, index=0x10, write=False, value=0):
    return audit.record(vcpu=0, rip=0x1000, index=index, write=write, value=value, reason=4,
                        action="deny", result="#GP")


def lines(buf):
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_burst_then_refill_at_rate_per_second():
    clock, buf = Clock(), io.StringIO()
    audit = AuditLog(buf, rate=4.0, burst=3, clock=clock)
    assert [rec(audit) for _ in range(4)] == [True, True, True, False]
    clock.t += 0.25                      # 0.25 s * 4/s = exactly one token
    assert [rec(audit), rec(audit)] == [True, False]
    clock.t += 0.125                     # half a token: still nothing
    assert rec(audit) is False
    clock.t += 0.125                     # the other half
    assert rec(audit) is True
    assert (audit.written, audit.suppressed) == (5, 3)
    assert [x.get("suppressed_before", 0) for x in lines(buf)] == [0, 0, 0, 1, 2]


def test_refill_is_capped_at_burst():
    clock = Clock()
    audit = AuditLog(None, rate=2.0, burst=2, clock=clock)
    assert [rec(audit), rec(audit), rec(audit)] == [True, True, False]
    clock.t += 1000.0                    # would be 2000 tokens without the cap
    assert [rec(audit) for _ in range(3)] == [True, True, False]


def test_slow_rate_below_one_per_second():
    clock = Clock()
    audit = AuditLog(None, rate=0.5, burst=1, clock=clock)
    assert [rec(audit), rec(audit)] == [True, False]
    clock.t += 1.0                       # half a token
    assert rec(audit) is False
    clock.t += 1.0
    assert rec(audit) is True


def test_buckets_are_per_msr_and_direction():
    audit = AuditLog(None, rate=1.0, burst=1, clock=Clock())
    assert [rec(audit, 0x10), rec(audit, 0x10, write=True), rec(audit, 0x11), rec(audit, 0x10)] == \
        [True, True, True, False]
    assert audit.suppressed == 1 and audit.written == 3


def test_record_fields():
    buf = io.StringIO()
    audit = AuditLog(buf, clock=Clock(12.5))
    audit.record(vcpu=1, rip=0xFFFF, index=0xC0000082, write=True, value=0xABC, reason=1,
                 action="emulate", result="written", rule="p.toml:3 (rule 1)")
    audit.record(vcpu=0, rip=None, index=0x10, write=False, value=0, reason=2, action="ignore",
                 result="read 0x0")
    a, b = lines(buf)
    assert a == {"schema": 1, "time": 12.5, "vcpu": 1, "rip": "0xffff", "msr": "0xc0000082", "name": a["name"],
                 "access": "write", "value": "0xabc", "reason": "INVAL", "action": "emulate",
                 "result": "written", "rule": "p.toml:3 (rule 1)"}
    assert "LSTAR" in a["name"]
    assert b["rip"] is None and b["reason"] == "UNKNOWN" and b["access"] == "read" and "rule" not in b


def test_counts_and_summary_include_suppressed_and_unlogged():
    clock, buf = Clock(), io.StringIO()
    audit = AuditLog(buf, rate=1.0, burst=1, clock=clock)
    rec(audit), rec(audit), rec(audit)
    audit.count(0x186, True, "ignore", "dropped")
    assert audit.summary() == [
        {"msr": "0x10", "name": audit.summary()[0]["name"], "access": "read", "action": "deny",
         "result": "#GP", "count": 3, "unlogged": 2},
        {"msr": "0x186", "name": audit.summary()[1]["name"], "access": "write", "action": "ignore",
         "result": "dropped", "count": 1, "unlogged": 0}]


def test_close_reports_suppressed_counts_once():
    clock, buf = Clock(7.0), io.StringIO()
    audit = AuditLog(buf, rate=1.0, burst=1, clock=clock)
    rec(audit), rec(audit), rec(audit), rec(audit, 0x11)
    audit.close()
    out = lines(buf)
    assert len(out) == 3
    assert out[-1] == {"schema": 1, "time": 7.0, "msr": "0x10", "name": out[-1]["name"], "access": "read",
                       "suppressed": 2}
    assert audit.summary()[0]["unlogged"] == 2          # decisions without a record of their own (issue 10)


def test_file_sink_appends_and_closes(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text('{"old": 1}\n')
    audit = AuditLog(str(path), clock=Clock())
    rec(audit)
    audit.close()
    got = [json.loads(line) for line in path.read_text().splitlines()]
    assert got[0] == {"old": 1} and got[1]["msr"] == "0x10" and len(got) == 2


def test_defaults_are_20_per_second_burst_20():
    clock = Clock()
    audit = AuditLog(None, clock=clock)
    assert [rec(audit) for _ in range(21)] == [True] * 20 + [False]
    clock.t += 49 / 1024                 # 0.957 tokens at 20/s (1.005 at 21/s)
    assert rec(audit) is False
    clock.t += 3 / 1024                  # 52/1024 s * 20/s = 1.016 tokens
    assert rec(audit) is True


def test_time_is_rounded_to_microseconds_and_names_are_given():
    clock, buf = Clock(12.123456789), io.StringIO()
    audit = AuditLog(buf, rate=1.0, burst=1, clock=clock)
    rec(audit, write=True), rec(audit, write=True)
    audit.close()
    first, last = lines(buf)
    assert first["time"] == 12.123457 and first["name"] == "IA32_TSC"
    assert last == {"schema": 1, "time": 12.123457, "msr": "0x10", "name": "IA32_TSC", "access": "write",
                    "suppressed": 1}
    assert audit.summary()[0]["name"] == "IA32_TSC"


def test_count_adds_up():
    audit = AuditLog(None)
    for _ in range(3):
        audit.count(0x10, False, "ignore", "read 0x0")
    assert [r["count"] for r in audit.summary()] == [3]


def test_after_close_records_are_counted_not_written():
    buf = io.StringIO()
    audit = AuditLog(buf, clock=Clock())
    audit.close()
    assert rec(audit) is True and buf.getvalue() == ""
    audit.close()                        # twice is fine
    assert audit.summary()[0]["count"] == 1


def test_file_sink_is_line_buffered(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(str(path), clock=Clock())
    rec(audit)
    assert len(path.read_text().splitlines()) == 1     # readable before close (tail -f)
    audit.close()


def test_file_sink_is_closed_by_close(tmp_path):
    import os
    before = len(os.listdir("/proc/self/fd"))
    audit = AuditLog(str(tmp_path / "a.jsonl"), clock=Clock())
    assert len(os.listdir("/proc/self/fd")) == before + 1
    audit.close()
    assert len(os.listdir("/proc/self/fd")) == before
