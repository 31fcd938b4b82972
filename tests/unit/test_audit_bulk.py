"""AuditLog's entry for the C drain (BulkEntry: write_lines, add_counts, owe) and close(), with
hand-written expectations: whole lines or nothing in the file, how many went out, what was lost,
and the suppressed counts owed at close.  Full and short writes come from /dev/full and from
RLIMIT_FSIZE (setrlimit(2): a write that crosses the limit is cut short, the next fails EFBIG),
the latter in a child process so that no other file of the test run is limited."""
import io
import json
import subprocess
import sys
import textwrap

import pytest

from kvmgate.audit import AuditFailure, AuditLog


def lines_of(n: int, width: int = 40) -> bytes:
    return b"".join(json.dumps({"n": i, "pad": "x" * width}).encode() + b"\n" for i in range(n))


def test_file_sink_writes_every_line(tmp_path):
    path = tmp_path / "a.jsonl"
    audit = AuditLog(path)
    data = lines_of(3)
    assert audit.write_lines(data, 3) == 3 and audit.written == 3 and audit.failed == 0
    assert audit.write_lines(lines_of(2), 2) == 2 and audit.written == 5
    audit.close()
    assert path.read_bytes() == data + lines_of(2)


def test_stream_sink_writes_or_fails_whole_batches():
    buf = io.StringIO()
    audit = AuditLog(buf)
    assert audit.write_lines(lines_of(2), 2) == 2 and buf.getvalue().encode() == lines_of(2)

    class Broken(io.StringIO):
        def write(self, s):
            raise OSError(5, "Input/output error")

    stop = AuditLog(Broken())
    for k in (1, 2):                            # the counts add up over failures
        with pytest.raises(AuditFailure) as ei:
            stop.write_lines(lines_of(4), 4)
        assert ei.value.lines_written == 0 and stop.failed == 4 * k and stop.written == 0
    said = []
    warn = AuditLog(Broken(), on_failure="warn", warn=said.append)
    assert warn.write_lines(lines_of(4), 4) == 0
    assert warn.failed == 4 and warn.written == 0 and len(said) == 1
    assert warn.write_lines(lines_of(3), 3) == 0
    assert warn.failed == 7 and len(said) == 1  # one warning per failing stretch


@pytest.mark.parametrize("mode", ["stop", "warn"])
def test_full_device_loses_the_whole_batch(mode):
    said = []
    audit = AuditLog("/dev/full", on_failure=mode, warn=said.append)
    for k in (1, 2):                            # the counts add up over failures
        if mode == "stop":
            with pytest.raises(AuditFailure, match="No space left on device") as ei:
                audit.write_lines(lines_of(5), 5)
            assert ei.value.lines_written == 0
        else:
            assert audit.write_lines(lines_of(5), 5) == 0
            assert said == ["audit log /dev/full: write failed: No space left on device; the "
                            "guest goes on and records are counted as unlogged "
                            '(audit_failure = "warn")']
        assert audit.failed == 5 * k and audit.written == 0


SHORT = textwrap.dedent("""
    import json, resource, signal, sys
    from kvmgate.audit import AuditFailure, AuditLog
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    path, mode, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    data = b"".join(json.dumps({"n": i, "pad": "x" * 40}).encode() + b"\\n" for i in range(4))
    said = []
    audit = AuditLog(path, on_failure=mode, warn=said.append)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    out = {}
    try:
        out["done"] = audit.write_lines(data, 4)
    except AuditFailure as e:
        out["done"], out["error"] = e.lines_written, str(e)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    out["failed"], out["written"], out["said"] = audit.failed, audit.written, list(said)
    if mode == "warn":
        out["again"] = audit.write_lines(data[:data.index(b"\\n") + 1], 1)
        out["said_after"] = said[1:]
    audit.close()
    print(json.dumps(out))
""")


@pytest.mark.parametrize("mode", ["stop", "warn"])
def test_short_write_keeps_whole_lines_and_cuts_the_rest(tmp_path, mode):
    line = len(lines_of(1))                 # every line of the batch has this length (n < 10)
    path = tmp_path / "a.jsonl"
    r = subprocess.run([sys.executable, "-c", SHORT, str(path), mode, str(line + line // 2)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    data = path.read_bytes()
    batch = lines_of(4)
    assert out["done"] == 1 and out["written"] == 1 and out["failed"] == 3
    if mode == "stop":
        assert "short write" in out["error"] and "cut back to whole lines" in out["error"]
        assert data == batch[:line]             # the half line was cut back off
    else:
        assert len(out["said"]) == 1 and "short write" in out["said"][0]
        assert out["again"] == 1                # the limit is lifted: the log writes again
        assert out["said_after"] == ["audit log %s: writing again (3 records lost)" % path]
        assert data == batch[:line] * 2


def test_add_counts_adds_to_the_summary_and_the_suppressed_total():
    audit = AuditLog(io.StringIO())
    audit.add_counts([(0x10, False, "deny", "#GP", 5, 2), (0x10, True, "ignore", "dropped", 1, 0)],
                     suppressed=2)
    audit.add_counts([(0x10, False, "deny", "#GP", 3, 1)], suppressed=1)
    assert [(r["msr"], r["access"], r["count"], r["unlogged"]) for r in audit.summary()] == \
        [("0x10", "read", 8, 3), ("0x10", "write", 1, 0)]
    assert audit.suppressed == 3
    audit.add_counts([(0x11, False, "deny", "#GP", 1, 0)])      # none suppressed by default
    assert audit.suppressed == 3


def test_owed_suppressed_counts_are_written_at_close_once():
    buf = io.StringIO()
    audit = AuditLog(buf, clock=lambda: 5.0)
    audit.owe(0x10, False, 3)
    audit.owe(0x10, False, 2)
    audit.owe(0x11, True, 1)
    audit.close()
    audit.close()
    recs = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [(r["msr"], r["access"], r["suppressed"]) for r in recs] == \
        [("0x10", "read", 5), ("0x11", "write", 1)]
    assert all(r["time"] == 5.0 and r["schema"] == 1 for r in recs)


def test_owed_counts_go_out_with_the_next_record_of_that_msr():
    buf = io.StringIO()
    audit = AuditLog(buf, rate=1.0, burst=1, clock=lambda: 5.0)
    audit.owe(0x10, False, 4)
    assert audit.record(vcpu=0, rip=None, index=0x10, write=False, value=0, reason=4,
                        action="deny", result="#GP")
    audit.close()
    (rec,) = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert rec["suppressed_before"] == 4


@pytest.mark.parametrize("mode", ["stop", "warn"])
def test_close_on_a_full_device_closes_and_says_so(mode):
    said = []
    audit = AuditLog("/dev/full", on_failure=mode, warn=said.append)
    audit.owe(0x10, False, 2)
    audit.owe(0x11, False, 1)
    if mode == "stop":
        with pytest.raises(AuditFailure):
            audit.close()
    else:
        audit.close()
        assert len(said) == 1               # one failed write: the rest are not tried
    assert audit.closed and audit.failed == 1
    audit.close()                           # idempotent, even after a failure


@pytest.fixture
def file_size_limit():
    """setrlimit(RLIMIT_FSIZE) for this process, restored after: a write that crosses the
    limit is cut short, the next fails with EFBIG (SIGXFSZ ignored meanwhile).  Nothing else
    may write a file while it is set, so the test body only calls the audit log."""
    import resource
    import signal
    old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def limit(n):
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))

    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_sig)


def test_short_write_in_process_keeps_whole_lines(tmp_path, file_size_limit):
    """The same as the child-process test above, in this process (so that coverage-guided
    mutation testing sees it): 4 lines, room for 1.5, then the limit lifted."""
    import os
    line = len(lines_of(1))
    path = tmp_path / "a.jsonl"
    said = []
    audit = AuditLog(path, on_failure="warn", warn=said.append)
    file_size_limit(line + line // 2)
    try:
        done = audit.write_lines(lines_of(4), 4)
        again = audit.write_lines(lines_of(2), 2)       # at the limit: EFBIG, nothing written
    finally:
        file_size_limit(1 << 40)
    assert (done, again) == (1, 0)
    assert audit.written == 1 and audit.failed == 3 + 2
    assert len(said) == 1 and "short write: " in said[0] and "cut back to whole lines" in said[0]
    assert path.read_bytes() == lines_of(4)[:line] and os.path.getsize(path) == line
    assert audit.write_lines(lines_of(1), 1) == 1
    assert said[1] == f"audit log {path}: writing again (5 records lost)"
    audit.close()
    assert path.read_bytes() == lines_of(4)[:line] + lines_of(1)


def test_short_single_record_in_process_is_cut_back(tmp_path, file_size_limit):
    """record() (the Python path) on a short write: the partial line is cut back off."""
    path = tmp_path / "a.jsonl"
    said = []
    audit = AuditLog(path, rate=1e6, burst=10, on_failure="warn", warn=said.append)
    file_size_limit(10)
    try:
        ok = audit.record(vcpu=0, rip=None, index=0x10, write=False, value=0, reason=4,
                          action="deny", result="#GP")
    finally:
        file_size_limit(1 << 40)
    assert ok is False and path.read_bytes() == b"" and audit.failed == 1
    assert "short write: 10 of " in said[0] and "cut back" in said[0]
    with pytest.raises(AuditFailure, match="short write"):
        stop = AuditLog(tmp_path / "b.jsonl", rate=1e6, burst=10)
        file_size_limit(10)
        try:
            stop.record(vcpu=0, rip=None, index=0x10, write=False, value=0, reason=4,
                        action="deny", result="#GP")
        finally:
            file_size_limit(1 << 40)
    assert (tmp_path / "b.jsonl").read_bytes() == b""


def test_a_failed_record_owes_its_suppressed_count_and_recovery_is_said(tmp_path, file_size_limit):
    """record() through a failing stretch (EFBIG at the file size limit) in warn mode: the
    record that failed is unlogged, the suppressed count it carried is owed again and goes out
    with the next written record; the first good write says "writing again"."""
    import os
    t = [100.0]
    path = tmp_path / "a.jsonl"
    said = []
    audit = AuditLog(path, rate=1.0, burst=1, clock=lambda: t[0], on_failure="warn",
                     warn=said.append)

    def rec():
        return audit.record(vcpu=0, rip=None, index=0x10, write=False, value=0, reason=4,
                            action="deny", result="#GP")

    assert rec() is True and rec() is False         # the second is rate limited: owed 1
    t[0] += 1.0                                     # one token again
    file_size_limit(os.path.getsize(path))          # the next write fails with EFBIG
    try:
        assert rec() is False
    finally:
        file_size_limit(1 << 40)
    assert audit.failed == 1 and audit.written == 1 and audit.suppressed == 1
    assert said == [f"audit log {path}: write failed: File too large; the guest goes on and "
                    'records are counted as unlogged (audit_failure = "warn")']
    t[0] += 1.0
    assert rec() is True
    assert said[1:] == [f"audit log {path}: writing again (1 records lost)"]
    assert audit.failure is None
    audit.close()
    recs = [json.loads(x) for x in path.read_bytes().splitlines()]
    assert len(recs) == 2 and "suppressed_before" not in recs[0]
    assert recs[1]["suppressed_before"] == 1        # the count the failed record carried
    (row,) = audit.summary()
    assert row["count"] == 4 and row["unlogged"] == 2   # one suppressed, one lost


@pytest.mark.parametrize("mode", ["stop", "warn"])
def test_a_stream_error_without_errno_is_reported_as_eio(mode):
    """A closed stream raises ValueError, which has no errno: the failure says EIO."""
    import errno
    buf = io.StringIO()
    buf.close()
    said = []
    audit = AuditLog(buf, on_failure=mode, warn=said.append)
    if mode == "stop":
        with pytest.raises(AuditFailure) as ei:
            audit.write_lines(lines_of(1), 1)
        assert ei.value.errno == errno.EIO and "I/O operation on closed file" in str(ei.value)
    else:
        assert audit.write_lines(lines_of(1), 1) == 0
        assert said == ["audit log stream: write failed: I/O operation on closed file; the "
                        'guest goes on and records are counted as unlogged (audit_failure = "warn")']
    assert audit.failed == 1


def readlink(path):
    import os
    try:
        return os.readlink(path)
    except FileNotFoundError:       # listdir's own descriptor, closed by now
        return None


def test_a_fifo_gets_whole_lines_and_a_short_write_there_counts_nothing(tmp_path):
    """A log path that cannot seek (a FIFO read by another program): lines go out as on a
    file; a short write cannot be cut back, so what went out stays and the batch counts as
    lost (no ftruncate on a pipe).  The short write is made by a non-blocking pipe of one page."""
    import fcntl
    import os
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    said = []
    try:
        audit = AuditLog(fifo, on_failure="warn", warn=said.append)
        assert audit.write_lines(lines_of(3), 3) == 3
        assert os.read(reader, 1 << 16) == lines_of(3)
        fds = [n for n in map(int, os.listdir("/proc/self/fd"))  # the log's own descriptor
               if n != reader and readlink(f"/proc/self/fd/{n}") == str(fifo)]
        assert len(fds) == 1
        page = fcntl.fcntl(reader, fcntl.F_SETPIPE_SZ, 4096)
        big = lines_of(80)                          # > one page
        assert len(big) > page
        fcntl.fcntl(fds[0], fcntl.F_SETFL, fcntl.fcntl(fds[0], fcntl.F_GETFL) | os.O_NONBLOCK)
        assert audit.write_lines(big, 80) == 0
        assert audit.written == 3 and audit.failed == 80
        assert said == [f"audit log {fifo}: write failed: No space left on device (short write: "
                        f"{page} of {len(big)} bytes, cut back to whole lines); the guest goes "
                        'on and records are counted as unlogged (audit_failure = "warn")']
        assert os.read(reader, 1 << 16) == big[:page]   # what went out stays
        audit.close()
    finally:
        os.close(reader)


def test_a_bad_failure_mode_is_refused_by_name():
    with pytest.raises(ValueError, match=r"^on_failure='sometimes': one of \('stop', 'warn'\)$"):
        AuditLog(None, on_failure="sometimes")


def test_a_short_write_keeps_every_whole_line_before_the_cut(tmp_path, file_size_limit):
    """Room for 2.5 of 4 lines: the two whole lines stay (cut back to the last newline
    written, not the first), the half line goes."""
    line = len(lines_of(1))
    path = tmp_path / "a.jsonl"
    audit = AuditLog(path, on_failure="warn", warn=lambda m: None)
    file_size_limit(2 * line + line // 2)
    try:
        done = audit.write_lines(lines_of(4), 4)
    finally:
        file_size_limit(1 << 40)
    assert done == 2 and audit.written == 2 and audit.failed == 2
    assert path.read_bytes() == lines_of(4)[:2 * line]
    audit.close()


def test_a_log_that_gets_descriptor_0_works(tmp_path):
    """A daemon started with stdin closed: the log's open(2) returns 0, which is a descriptor
    like any other (the closed log is -1): records, batches, the owed counts at close, a
    reopen after logrotate moved the file."""
    import os

    def record(audit):
        return audit.record(vcpu=0, rip=None, index=0x10, write=False, value=0, reason=4,
                            action="deny", result="#GP")

    saved = os.dup(0)
    path, rotated = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    try:
        os.close(0)
        audit = AuditLog(path, rate=1e6, burst=10)
        assert not audit.closed
        assert audit.write_lines(lines_of(2), 2) == 2
        assert record(audit)                         # on descriptor 0
        audit.owe(0x10, False, 3)
        audit.close()                                # the owed count, then descriptor 0 closed
        assert audit.closed
        free = os.open(os.devnull, os.O_RDONLY)      # so 0 is free again
        os.close(free)
        log = AuditLog(rotated, rate=1e6, burst=10)  # descriptor 0 again
        os.rename(rotated, tmp_path / "b.jsonl.1")   # logrotate moves it away, then reopen
        log.reopen()
        assert record(log)
        log.close()
    finally:
        os.dup2(saved, 0)
        os.close(saved)
    assert free == 0
    recs = [json.loads(x) for x in path.read_bytes().splitlines()]
    assert [r.get("n") for r in recs[:2]] == [0, 1]
    assert [(r["msr"], r.get("result"), r.get("suppressed")) for r in recs[2:]] == \
        [("0x10", "#GP", None), ("0x10", None, 3)]
    assert (tmp_path / "b.jsonl.1").read_bytes() == b""
    assert [json.loads(x)["result"] for x in rotated.read_bytes().splitlines()] == ["#GP"]


def test_a_stream_error_keeps_its_own_errno():
    """A stream's OSError says why (ENOSPC here, not the EIO fallback of errors without one)."""
    import errno

    class Full(io.StringIO):
        def write(self, s):
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(AuditFailure) as ei:
        AuditLog(Full()).write_lines(lines_of(1), 1)
    assert ei.value.errno == errno.ENOSPC
    assert str(ei.value).startswith("[Errno 28] audit log stream: write failed: [Errno 28] No space")
