"""The command line: user mistakes exit 2 with a located message and no traceback."""
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ..expected import PROBE_AUDIT, audit_decisions

EXAMPLES = Path(__file__).resolve().parents[2] / "kvmgate" / "examples"


def kvmgate(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "kvmgate", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


@pytest.mark.parametrize("content,where", [
    ("[policy]\ndefault = 'nope'\n", "bad.toml:2"),
    ("[[rule]]\nmsr = 'NO_SUCH_MSR'\naction = 'deny'\n", "bad.toml:2"),
    ("not toml at all [", "bad.toml"),
])
def test_policy_check_bad_file_exit_2(tmp_path, content, where):
    f = tmp_path / "bad.toml"
    f.write_text(content)
    r = kvmgate("policy", "check", str(f))
    assert r.returncode == 2 and where in r.stderr and "Traceback" not in r.stderr


def test_missing_file_and_bad_arguments_exit_2(tmp_path):
    r = kvmgate("policy", "check", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "missing.toml" in r.stderr and "Traceback" not in r.stderr
    r = kvmgate("policy", "explain", str(EXAMPLES / "deny-by-default.toml"), "NOT_AN_MSR")
    assert r.returncode == 2 and "NOT_AN_MSR" in r.stderr
    r = kvmgate("frobnicate")
    assert r.returncode == 2


def test_policy_check_compile_explain_diff():
    pol = str(EXAMPLES / "deny-by-default.toml")
    r = kvmgate("policy", "check", pol)
    assert r.returncode == 0 and "OK" in r.stdout
    rep = json.loads(kvmgate("policy", "compile", pol, "--json").stdout)
    assert rep["default"] == "DEFAULT_DENY" and 1 <= len(rep["ranges"]) <= 16
    rows = json.loads(kvmgate("policy", "explain", pol, "LSTAR", "--json").stdout)
    assert {(r["access"], r["handled_by"]) for r in rows} == {("read", "kernel"), ("write", "user space: emulate")}
    r = kvmgate("policy", "diff", pol, pol)
    assert r.returncode == 0 and "no difference" in r.stdout


@pytest.mark.kvm
def test_run_with_policy_and_audit(tmp_path):
    audit = tmp_path / "audit.jsonl"
    r = kvmgate("run", "--policy", str(EXAMPLES / "deny-by-default.toml"), str(EXAMPLES / "probe.S"),
                "--audit", str(audit), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["gp_faults"] == 3
    assert audit_decisions(audit.read_text()) == PROBE_AUDIT


@pytest.mark.kvm
def test_demo_runs():
    r = kvmgate("demo")
    assert r.returncode == 0 and "MSR_CORE_THREAD_COUNT" in r.stdout and "user space (FILTER)" in r.stdout


class Child:
    """`kvmgate run ...` in a child process whose stderr lines are read as they come, so a
    test waits for a line (readiness, a reload) instead of sleeping.  Always killed and
    reaped on leaving the block."""

    def __init__(self, *args):
        self.p = subprocess.Popen([sys.executable, "-m", "kvmgate", "run", *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: "queue.Queue[str | None]" = queue.Queue()
        self.err: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.p.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def wait_line(self, text: str, timeout: float = 60) -> str:
        """The next stderr line containing `text`; fails if the child's stderr ends first."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no line with {text!r} within {timeout} s; stderr so far: {self.err}"
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            assert line is not None, f"child ended without a line with {text!r}: {self.err}"
            self.err.append(line)
            if text in line:
                return line

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        out = self.p.stdout.read()
        self.p.wait(timeout=timeout)
        self.reader.join(timeout)
        while True:
            line = self.lines.get_nowait() if not self.lines.empty() else None
            if line is None:
                break
            self.err.append(line)
        return self.p.returncode, out, "".join(self.err)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        for f in (self.p.stdout, self.p.stderr):
            f.close()


READY = "kvmgate: running pid"


def wait_for(cond, what: str, timeout: float = 60):
    """Poll a condition (not a fixed sleep): fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)
SPIN_35 = "again:\nmov ecx, 0x35\nrdmsr\ncmp eax, 2\njne again\nhlt\n"
CONST_35 = "[policy]\ndefault='allow'\n[[rule]]\nmsr=0x35\naccess='read'\naction='constant'\nvalue={}\n"


@pytest.mark.kvm
def test_sighup_reloads_policy_while_guest_runs(tmp_path):
    pol = tmp_path / "p.toml"
    pol.write_text(CONST_35.format(1))
    guest = tmp_path / "g.S"
    guest.write_text(SPIN_35)
    with Child("--policy", str(pol), str(guest), "--timeout", "60", "--json") as c:
        assert str(c.p.pid) in c.wait_line(READY)           # spinning under value 1
        bad = [b"this is not toml [", b"policy = 5\n", b"rule = [1, 2]\n", b"policy = []\n",
               b"[policy]\nname = '\xff\xfe'\n", b"[[rule]]\nmsr = 0x35\naccess = ['read']\n"]
        for content in bad:                                  # each refused, the old policy stays
            pol.write_bytes(content)
            c.p.send_signal(signal.SIGHUP)
            assert "kvmgate: reload refused: " in c.wait_line("reload")
            assert c.p.poll() is None
        pol.unlink()
        c.p.send_signal(signal.SIGHUP)
        assert "reload refused" in c.wait_line("reload")
        pol.write_text(CONST_35.format(2))
        c.p.send_signal(signal.SIGHUP)
        assert str(pol) in c.wait_line("kvmgate: reloaded")
        rc, out, err = c.finish()
    assert rc == 0, err
    assert "Traceback" not in err
    assert json.loads(out)["regs"]["0"]["rax"] == "0x2"


@pytest.mark.kvm
@pytest.mark.parametrize("vcpus", [1, 2])
def test_sighup_storm_coalesces_and_the_run_ends_at_its_timeout(tmp_path, vcpus):
    pol = tmp_path / "p.toml"
    pol.write_text(CONST_35.format(1))
    guest = tmp_path / "g.S"
    guest.write_text(SPIN_35)
    with Child("--policy", str(pol), str(guest), "--vcpus", str(vcpus), "--timeout", "4") as c:
        c.wait_line(READY)
        for _ in range(100):
            c.p.send_signal(signal.SIGHUP)
        rc, out, err = c.finish()
    assert rc == 1 and "did not halt within 4.0 s" in err, err    # the timeout, not a hang
    assert "did not pause" not in err and "Traceback" not in err
    reloads = err.count("kvmgate: reloaded")
    assert 1 <= reloads <= 100 and "refused" not in err


@pytest.mark.kvm
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_stop_every_vcpu_the_same_clean_way(tmp_path, sig, code):
    """Both write the audit's suppressed counts and print the summary.  vCPU 0 makes 50 denied
    reads of 0x1a0 (1 record, 49 suppressed), then one of 0x1a2 (its record tells the test the
    50 are done); every vCPU then spins until the signal."""
    pol = tmp_path / "p.toml"
    pol.write_text("[policy]\ndefault='allow'\naudit_rate=1e-9\naudit_burst=1\n"
                   "[[rule]]\nmsrs=[0x1a0, 0x1a2]\naccess='read'\naction='deny'\nlog=true\n")
    guest = tmp_path / "spin.S"
    guest.write_text("test rdi, rdi\njnz spin\nmov rbx, 50\nagain:\nmov ecx, 0x1a0\nrdmsr\n"
                     "dec rbx\njnz again\nmov ecx, 0x1a2\nrdmsr\nspin:\njmp spin\n")
    audit = tmp_path / "audit.jsonl"
    with Child("--policy", str(pol), str(guest), "--vcpus", "3", "--timeout", "120",
               "--audit", str(audit), "--json") as c:
        c.wait_line(READY)
        wait_for(lambda: "0x1a2" in audit.read_text(), "the audit record of 0x1a2")
        c.p.send_signal(sig)
        rc, out, err = c.finish()
    assert rc == code and "Traceback" not in err, err
    res = json.loads(out)
    assert res["halted"] is False and res["signal"] == sig
    assert [(d["msr"], d["count"], d["unlogged"]) for d in res["decisions"]] == \
        [("0x1a0", 50, 49), ("0x1a2", 1, 0)]
    assert res["msr_exits"] == 51 and res["gp_faults"] >= 50   # the 51st #GP may be under way
    recs = [json.loads(line) for line in audit.read_text().splitlines()]
    assert all(r["schema"] == 1 for r in recs)
    assert [(r["msr"], r.get("result"), r.get("suppressed")) for r in recs] == \
        [("0x1a0", "#GP", None), ("0x1a2", "#GP", None), ("0x1a0", None, 49)]


@pytest.mark.kvm
def test_unlogged_counts_the_rate_limited_records(tmp_path):
    pol = tmp_path / "p.toml"
    pol.write_text("[policy]\ndefault='allow'\naudit_rate=1e-9\naudit_burst=5\n"
                   "[[rule]]\nmsr=0x1a0\naccess='read'\naction='deny'\nlog=true\n")
    guest = tmp_path / "g.S"
    guest.write_text("mov rbx, 1000\nagain:\nmov ecx, 0x1a0\nrdmsr\ndec rbx\njnz again\nhlt\n")
    audit = tmp_path / "audit.jsonl"
    r = kvmgate("run", "--policy", str(pol), str(guest), "--audit", str(audit), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["gp_faults"] == 1000
    assert [(d["msr"], d["count"], d["unlogged"]) for d in res["decisions"]] == [("0x1a0", 1000, 995)]
    recs = [json.loads(line) for line in audit.read_text().splitlines()]
    assert len([x for x in recs if "result" in x]) == 5
    assert [x["suppressed"] for x in recs if "suppressed" in x] == [995]


@pytest.mark.kvm
def test_run_flat_binary_guest(tmp_path):
    from kvmgate.asm import assemble
    code = assemble("mov ecx, 0x35\nrdmsr\nhlt", 0x10000)
    (tmp_path / "g.bin").write_bytes(code)
    (tmp_path / "p.toml").write_text(
        "[policy]\ndefault='allow'\n[[rule]]\nmsr=0x35\naccess='read'\naction='constant'\nvalue=0x42\n")
    r = kvmgate("run", "--policy", str(tmp_path / "p.toml"), str(tmp_path / "g.bin"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["regs"]["0"]["rax"] == "0x42"


def test_run_bad_guest_source_exit_2(tmp_path):
    (tmp_path / "g.S").write_text("mov ecx, 0x35\nfrobnicate rax\nhlt\n")
    r = kvmgate("run", str(tmp_path / "g.S"))
    assert r.returncode == 2 and "line 2" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.kvm
def test_info_reports_capabilities_and_ignore_msrs():
    out = json.loads(kvmgate("info", "--json").stdout)
    assert out["api_version"] == 12
    assert out["KVM_CAP_X86_USER_SPACE_MSR"] == 1 and out["KVM_CAP_X86_MSR_FILTER"] == 1
    sysfs = Path("/sys/module/kvm/parameters/ignore_msrs")
    assert out["ignore_msrs"] == ({"Y": True, "N": False}.get(sysfs.read_text().strip()) if sysfs.exists() else None)


@pytest.mark.kvm
def test_sigusr1_reopens_the_audit_log_for_logrotate(tmp_path):
    pol = tmp_path / "p.toml"
    pol.write_text("[policy]\ndefault='allow'\naudit_rate=1e6\naudit_burst=1000000\n"
                   "[[rule]]\nmsr=0x1a0\naccess='read'\naction='deny'\nlog=true\n")
    guest = tmp_path / "g.S"
    guest.write_text("again:\nmov ecx, 0x1a0\nrdmsr\njmp again\n")
    audit, rotated = tmp_path / "audit.jsonl", tmp_path / "audit.jsonl.1"
    with Child("--policy", str(pol), str(guest), "--audit", str(audit), "--timeout", "120") as c:
        c.wait_line(READY)
        wait_for(lambda: audit.exists() and audit.stat().st_size > 0, "audit records")
        audit.rename(rotated)                          # what logrotate does, then postrotate:
        c.p.send_signal(signal.SIGUSR1)
        assert str(audit) in c.wait_line("audit log reopened")
        wait_for(lambda: audit.exists() and audit.stat().st_size > 0, "records in the new file")
        c.p.send_signal(signal.SIGTERM)
        rc, out, err = c.finish()
    assert rc == 143 and "Traceback" not in err, err
    for f in (rotated, audit):
        recs = [json.loads(line) for line in f.read_text().splitlines()]
        assert recs and all(r["schema"] == 1 and r["msr"] == "0x1a0" for r in recs)


def test_audit_failure_must_be_stop_or_warn(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text("[policy]\ndefault = 'allow'\naudit_failure = 'ignore'\n")
    r = kvmgate("policy", "check", str(f))
    assert r.returncode == 2 and "p.toml:3" in r.stderr and "audit_failure" in r.stderr
