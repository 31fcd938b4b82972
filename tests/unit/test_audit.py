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


# ---- failures, modes and the records that are no decision (hand-written expectations)

def test_stop_mode_failure_names_the_log_the_error_and_the_mode():
    import errno
    import pytest
    from kvmgate.audit import AuditFailure
    audit = AuditLog("/dev/full", rate=1e6, burst=10)             # every write: ENOSPC
    with pytest.raises(AuditFailure) as ei:
        rec(audit)
    e = ei.value
    assert e.errno == errno.ENOSPC and e.path == "/dev/full"
    assert str(e) == ("[Errno 28] audit log /dev/full: write failed: No space left on device; "
                      'guest stopped (audit_failure = "stop")')
    assert audit.failed == 1


def test_warn_mode_warns_once_per_failing_stretch_and_again_after_reopen():
    said = []
    audit = AuditLog("/dev/full", rate=1e6, burst=10, on_failure="warn", warn=said.append)
    assert rec(audit) is False and rec(audit) is False
    assert said == ["audit log /dev/full: write failed: No space left on device; the guest goes "
                    'on and records are counted as unlogged (audit_failure = "warn")']
    assert audit.failed == 2 and audit.failure == "No space left on device"
    audit.reopen()                         # logrotate's signal: a fresh start, warned afresh
    assert audit.failure is None
    assert rec(audit) is False and len(said) == 2 and said[1] == said[0]


def test_a_failing_stream_is_named_stream():
    import pytest
    from kvmgate.audit import AuditFailure

    class Broken(io.StringIO):
        def write(self, s):
            raise OSError(5, "Input/output error")

    with pytest.raises(AuditFailure, match=r"^\[Errno 5\] audit log stream: write failed: "):
        rec(AuditLog(Broken()))
    said = []
    assert rec(AuditLog(Broken(), on_failure="warn", warn=said.append)) is False
    assert said[0].startswith("audit log stream: write failed: ")


def test_a_new_log_file_is_private(tmp_path):
    import os
    old = os.umask(0o022)
    try:
        AuditLog(tmp_path / "a.jsonl").close()
    finally:
        os.umask(old)
    assert (tmp_path / "a.jsonl").stat().st_mode & 0o777 == 0o600


def test_warnings_go_to_stderr_with_the_program_name(capsys):
    audit = AuditLog("/dev/full", on_failure="warn")
    rec(audit)
    err = capsys.readouterr().err
    assert err.startswith("kvmgate: warning: audit log /dev/full: write failed: ")
    assert err.endswith('(audit_failure = "warn")\n') and err.count("\n") == 1


def test_event_records_are_written_whole_and_not_counted():
    buf = io.StringIO()
    audit = AuditLog(buf, clock=Clock(12.3456789))
    audit.event("active", domain="web", msrs=3)
    assert lines(buf) == [{"schema": 1, "time": 12.345679, "event": "active", "domain": "web",
                           "msrs": 3}]
    assert audit.summary() == [] and audit.written == 0
    audit.close()
    audit.event("late")
    assert len(lines(buf)) == 1                 # a closed log writes nothing more


def test_configure_changes_rate_burst_and_mode_and_keeps_the_counts():
    import pytest
    clock = Clock()
    buf = io.StringIO()
    audit = AuditLog(buf, rate=1.0, burst=1, clock=clock)
    assert rec(audit) and not rec(audit)
    audit.configure(1000.0, 5, "warn")
    assert (audit.rate, audit.burst, audit.on_failure) == (1000.0, 5, "warn")
    clock.t += 0.01                              # 10 tokens at the new rate, capped at 5
    assert [rec(audit) for _ in range(6)] == [True] * 5 + [False]
    assert audit.summary()[0]["count"] == 8
    with pytest.raises(ValueError, match="on_failure='sometimes'"):
        audit.configure(1.0, 1, "sometimes")
    assert audit.on_failure == "warn"
