"""A failed audit write follows auditd's model (audit_failure = "stop" | "warn"), on a real full
disk (a small tmpfs mounted here) and on /dev/full; every complete line stays valid JSON."""
import io
import json
import os
import subprocess
import sys

import pytest

from kvmgate.audit import AuditFailure, AuditLog
from kvmgate.msr.model import EXIT_REASON_FILTER

LOUD = ("[policy]\ndefault='allow'\naudit_rate=1e6\naudit_burst=1000000\n{extra}"
        "[[rule]]\nmsr=0x1a0\naccess='read'\naction='deny'\nlog=true\n")
GUEST = "mov rbx, 20000\nagain:\nmov ecx, 0x1a0\nrdmsr\ndec rbx\njnz again\nhlt\n"


@pytest.fixture
def small_disk(tmp_path):
    """A 16 KiB tmpfs: the audit log fills it after ~60 records."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def run(*args):
    return subprocess.run([sys.executable, "-m", "kvmgate", "run", *args], capture_output=True,
                          text=True, timeout=120)


def valid_lines(path):
    """Every line is a whole JSON record (a cut line would fail json.loads)."""
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("mode", ["stop", "warn"])
def test_full_disk_under_the_audit_log(tmp_path, small_disk, mode):
    pol = tmp_path / "p.toml"
    extra = "" if mode == "stop" else "audit_failure='warn'\n"   # "stop" is the default
    pol.write_text(LOUD.format(extra=extra))
    (tmp_path / "g.S").write_text(GUEST)
    audit = small_disk / "audit.jsonl"
    r = run("--policy", str(pol), str(tmp_path / "g.S"), "--audit", str(audit), "--json")
    assert "Traceback" not in r.stderr
    # the readiness line comes once the vCPUs run: a failed write can come before it (or the
    # stopped run end before it is printed)
    said = [line for line in r.stderr.splitlines() if not line.startswith("kvmgate: running pid")]
    recs = valid_lines(audit)
    assert 10 < len(recs) < 20000 and all(x["schema"] == 1 for x in recs)
    decisions = json.loads(r.stdout)["decisions"]
    (row,) = decisions
    if mode == "stop":
        assert r.returncode == 1, r.stderr
        assert "audit log" in r.stderr and "No space left on device" in r.stderr
        assert 'audit_failure = "stop"' in r.stderr and len(said) == 1, said
        assert row["count"] < 20000                      # the guest was stopped
    else:
        assert r.returncode == 0, r.stderr
        assert 'audit_failure = "warn"' in r.stderr and "No space left on device" in r.stderr
        assert len(said) == 1, said
        assert row["count"] == 20000 and row["unlogged"] == 20000 - len(recs)


def record(log, n=1):
    for _ in range(n):
        log.record(vcpu=0, rip=0x10000, index=0x1a0, write=False, value=0,
                   reason=EXIT_REASON_FILTER, action="deny", result="#GP")


def test_dev_full_stop_raises_and_warn_counts():
    log = AuditLog("/dev/full")
    with pytest.raises(AuditFailure) as ei:
        record(log)
    assert ei.value.errno == 28 and "/dev/full" in str(ei.value)
    log.close()
    warned = []
    log = AuditLog("/dev/full", on_failure="warn", warn=warned.append)
    record(log, 3)
    assert len(warned) == 1 and "write failed" in warned[0]     # one warning per failing stretch
    assert log.failed == 3 and log.written == 0
    assert [(r["count"], r["unlogged"]) for r in log.summary()] == [(3, 3)]
    log.close()
    with pytest.raises(ValueError):
        AuditLog(None, on_failure="ignore")


def test_reopen_follows_logrotate(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    record(log)
    os.rename(path, tmp_path / "audit.jsonl.1")           # logrotate moves it away
    record(log)                                          # still into the moved file
    log.reopen()
    record(log)
    log.close()
    assert len(valid_lines(tmp_path / "audit.jsonl.1")) == 2
    assert len(valid_lines(path)) == 1


def test_records_carry_schema_and_nothing_else_changed():
    buf = io.StringIO()
    log = AuditLog(buf, clock=lambda: 5.0)
    record(log)
    log.close()
    assert json.loads(buf.getvalue()) == {
        "schema": 1, "time": 5.0, "vcpu": 0, "rip": "0x10000", "msr": "0x1a0",
        "name": "IA32_MISC_ENABLE", "access": "read", "value": "0x0", "reason": "FILTER",
        "action": "deny", "result": "#GP"}
