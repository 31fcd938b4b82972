"""`kvmgate wrap -- qemu-system-x86_64 ...`: policies, audit, transparency, fail-closed and
reload on a real, unmodified QEMU (microvm + the PVH test guest of pvhguest.py)."""
from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvmgate.wrap import pvhguest
from tests.qemu import procs

ROOT = Path(__file__).resolve().parents[2]
EFER = 0xC0000080
TIMEOUT = 60

# the guest's own long-mode entry writes EFER: every policy here lets the kernel handle it
ALLOW_EFER = """
[[rule]]
msr = "IA32_EFER"
access = "both"
action = "allow"
log = false
"""


def wrap_argv(*opts) -> list[str]:
    return [sys.executable, "-m", "kvmgate", "wrap", *opts, "--"]


def run(argv, env=None) -> subprocess.CompletedProcess:
    return procs.run(argv, TIMEOUT, cwd=ROOT, env=env)


def policy(tmp_path, text, name="p.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def audit_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def basic_guest(tmp_path_factory):
    d = tmp_path_factory.mktemp("guest")
    acc = [(0x35, 0, 0), (0x174, 1, 0x10), (0x174, 0, 0), (0x12345678, 0, 0),
           (0x12345678, 1, 5), (0xCE, 0, 0)]
    return acc, pvhguest.build(acc, d, vcpus=2)


@pytest.fixture(scope="module")
def unwrapped(basic_guest):
    _, elf = basic_guest
    r = run(pvhguest.qemu_argv(elf, 2))
    assert r.returncode == pvhguest.EXIT_OK, r.stderr
    out = pvhguest.parse(r.stdout)
    assert out["done"]
    return out


def test_policy_answers_on_two_vcpus_with_audit(tmp_path, basic_guest, unwrapped):
    _, elf = basic_guest
    pol = policy(tmp_path, """
[policy]
default = "allow"
[[rule]]
msr = 0xce
access = "read"
action = "constant"
value = 0x1234
[[rule]]
msr = 0x12345678
access = "both"
action = "ignore"
log = true
[[rule]]
msr = 0x174
access = "write"
action = "deny"
log = true
""")
    audit = tmp_path / "a.jsonl"
    r = run(wrap_argv("--policy", str(pol), "--audit", str(audit)) + pvhguest.qemu_argv(elf, 2))
    assert r.returncode == pvhguest.EXIT_OK, r.stderr
    out = pvhguest.parse(r.stdout)
    assert out["done"]
    for v in (0, 1):
        assert out[(v, 0xCE, 0)] == (0x1234, 0)                  # constant
        assert out[(v, 0x12345678, 0)] == (0, 0)                 # ignore: read 0, no #GP
        assert out[(v, 0x12345678, 1)][1] == 0                   # ignore: write dropped
        assert out[(v, 0x174, 1)][1] == 1                        # deny: #GP
        assert out[(v, 0x35, 0)] == unwrapped[(v, 0x35, 0)]      # QEMU's own answer
    recs = audit_records(audit)
    seen = {(rec["vcpu"], rec["msr"], rec["access"], rec["action"], rec["result"]) for rec in recs}
    for v in (0, 1):
        assert (v, "0xce", "read", "constant", "read 0x1234") in seen
        assert (v, "0x12345678", "read", "ignore", "read 0x0") in seen
        assert (v, "0x12345678", "write", "ignore", "dropped") in seen
        assert (v, "0x174", "write", "deny", "#GP") in seen
    assert all(rec["rip"] and int(rec["rip"], 16) > 0x100000 for rec in recs)
    assert all(rec["rule"].startswith(str(pol)) for rec in recs)
    assert "answered by the policy" in r.stderr


@pytest.mark.parametrize("default", ["allow", "deny"])
def test_qemu_answers_0x35_itself_under_any_policy_not_naming_it(tmp_path, basic_guest, unwrapped,
                                                                 default):
    _, elf = basic_guest
    pol = policy(tmp_path, f'[policy]\ndefault = "{default}"\nlog = false\n' + ALLOW_EFER)
    r = run(wrap_argv("--policy", str(pol), "--json") + pvhguest.qemu_argv(elf, 2))
    assert r.returncode == pvhguest.EXIT_OK, r.stderr
    out = pvhguest.parse(r.stdout)
    for v in (0, 1):
        assert out[(v, 0x35, 0)] == unwrapped[(v, 0x35, 0)]
    summary = json.loads(r.stderr.strip().splitlines()[-1])
    assert summary["exits"]["vmm"] == 2                          # one 0x35 read per vCPU
    if default == "deny":
        assert out[(0, 0x174, 1)][1] == 1                        # denied: #GP
    else:
        assert out == unwrapped


def test_allow_all_wrap_is_transparent(basic_guest, unwrapped):
    _, elf = basic_guest
    r = run(wrap_argv() + pvhguest.qemu_argv(elf, 2))
    assert r.returncode == pvhguest.EXIT_OK, r.stderr
    assert pvhguest.parse(r.stdout) == unwrapped


def test_merge_that_does_not_fit_stops_the_vm(tmp_path, basic_guest):
    """16 ranges of its own + QEMU's 0x35 range = 17: QEMU's filter is refused, the guest never
    runs, and the message names the policy and why."""
    _, elf = basic_guest
    rules = "".join(f'[[rule]]\nmsr = {i * 0x10000:#x}\naccess = "both"\naction = "deny"\n'
                    for i in range(1, 17))
    pol = policy(tmp_path, '[policy]\ndefault = "allow"\n' + rules)
    r = run(wrap_argv("--policy", str(pol)) + pvhguest.qemu_argv(elf, 2))
    assert r.returncode not in (0, pvhguest.EXIT_OK)
    assert not pvhguest.parse(r.stdout)["done"]
    assert str(pol) in r.stderr and "16" in r.stderr


def test_shim_without_kvmgate_refuses_the_vm(basic_guest):
    from kvmgate.wrap.library import shim_path
    _, elf = basic_guest
    env = {k: v for k, v in os.environ.items() if k != "KVMGATE_SHIM"}
    env["LD_PRELOAD"] = str(shim_path())
    r = run(pvhguest.qemu_argv(elf, 1), env=env)
    assert r.returncode not in (0, pvhguest.EXIT_OK)
    assert not pvhguest.parse(r.stdout)["done"]
    assert "no policy" in r.stderr and "KVM_CREATE_VM" in r.stderr


def test_shim_is_inert_without_dev_kvm(tmp_path):
    """A preloaded process that never opens /dev/kvm (qemu-img, the VMM's helpers) is untouched."""
    from kvmgate.wrap.library import shim_path
    env = dict(os.environ, LD_PRELOAD=str(shim_path()))
    r = subprocess.run(["qemu-img", "create", "-f", "qcow2", str(tmp_path / "x.qcow2"), "1M"],
                       check=False, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert r.returncode == 0, r.stderr
    assert "kvmgate" not in r.stderr


def _until(stream, word: str, lines: list[str]) -> str:
    for line in stream:
        lines.append(line)
        if word in line:
            return line
    raise AssertionError(f"{word!r} never came: {''.join(lines)}")


def test_sighup_reloads_into_the_running_vm_and_a_bad_file_keeps_the_old(tmp_path):
    """The guest reads MSR 0x40001234 until it sees 2: policy A answers 1, so it spins until
    SIGHUP installs policy B.  A bad file in between is refused and the guest keeps spinning."""
    elf = pvhguest.build([(0x40001234, 0, 0)], tmp_path, vcpus=2, wait=2)
    rule = '[policy]\ndefault = "allow"\n{}[[rule]]\nmsr = 0x40001234\naccess = "read"\n' \
           'action = "constant"\nlog = true\nvalue = {}\n'
    pol = policy(tmp_path, rule.format("", 1))
    audit = tmp_path / "a.jsonl"
    proc = procs.start(wrap_argv("--policy", str(pol), "--audit", str(audit))
                       + pvhguest.qemu_argv(elf, 2), cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        _until(proc.stderr, "active in VMM", lines)
        _until(proc.stdout, "W", lines)                           # the guest spins on 1
        pol.write_text("[policy]\ndefault = \"sometimes\"\n")
        proc.send_signal(signal.SIGHUP)
        refused = _until(proc.stderr, "reload refused", lines)
        assert str(pol) in refused and "default" in refused
        assert proc.poll() is None                                # still spinning on 1
        pol.write_text(rule.format("\n\n", 2))                    # the rule moves to line 5
        proc.send_signal(signal.SIGHUP)
        _until(proc.stderr, "kvmgate: reloaded", lines)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        procs.kill_group(proc)
    assert proc.returncode == pvhguest.EXIT_OK, "".join(lines) + err
    res = pvhguest.parse(out)
    assert res[(0, 0x40001234, 0)] == (2, 0) and res[(1, 0x40001234, 0)] == (2, 0)
    # every record names the rule of the policy that made it, also records still in a ring
    # when the reload happened (the 0x2 ones may all be rate limited: the guest spun on 0x1)
    seen = {(r["result"], r["rule"]) for r in audit_records(audit) if "rule" in r}
    assert ("read 0x1", f"{pol}:3 (rule 1)") in seen
    assert seen <= {("read 0x1", f"{pol}:3 (rule 1)"), ("read 0x2", f"{pol}:5 (rule 1)")}


def _tgkill(pid: int, tid: int, sig: int) -> None:
    """A signal for one thread of another process (what the kernel does with a process signal
    when it picks that thread)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(234, pid, tid, sig) != 0:               # SYS_tgkill on x86-64
        raise OSError(ctypes.get_errno(), f"tgkill({pid}, {tid}, {sig})")


def _helper_threads(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_a_signal_the_kernel_hands_to_a_helper_thread_still_acts(tmp_path, sig):
    """A process signal may go to any thread that does not block it.  Handled only as a Python
    handler it waited for the main thread, blocked in waitpid until the VMM exits: a SIGHUP
    left the guest spinning on the old policy (found by the two-copy stress, round 11), a
    SIGTERM never reached QEMU.  Each helper thread of `kvmgate wrap` gets one here; a
    watchdog kills the wrap and its QEMU after TIMEOUT s, so a lost signal fails the test."""
    elf = pvhguest.build([(0x40001234, 0, 0)], tmp_path, vcpus=1, wait=2)
    rule = '[policy]\ndefault = "allow"\n[[rule]]\nmsr = 0x40001234\naccess = "read"\n' \
           'action = "constant"\nvalue = {}\n'
    pol = policy(tmp_path, rule.format(1))
    proc = procs.start(wrap_argv("--policy", str(pol)) + pvhguest.qemu_argv(elf, 1), cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dog = threading.Timer(TIMEOUT, procs.kill_group, (proc,))   # the wrap and its QEMU
    dog.start()
    lines: list[str] = []
    try:
        _until(proc.stderr, "active in VMM", lines)
        _until(proc.stdout, "W", lines)                           # the guest spins on 1
        pol.write_text(rule.format(2))
        sent = 0
        for tid in _helper_threads(proc.pid):
            try:
                _tgkill(proc.pid, tid, sig)
            except ProcessLookupError:                            # a thread that just ended
                continue
            sent += 1
            if sig == signal.SIGTERM:
                break
        assert sent
        if sig == signal.SIGHUP:
            _until(proc.stderr, "kvmgate: reloaded", lines)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        dog.cancel()
        procs.kill_group(proc)
    if sig == signal.SIGHUP:
        assert proc.returncode == pvhguest.EXIT_OK, "".join(lines) + err
        assert pvhguest.parse(out)[(0, 0x40001234, 0)] == (2, 0)
    else:
        assert "terminating on signal 15" in err, "".join(lines) + err   # QEMU got it
        assert proc.returncode == 0


def test_sigterm_goes_to_the_vmm(tmp_path):
    elf = pvhguest.build([(0x40001234, 0, 0)], tmp_path, vcpus=1, wait=7)   # spins for ever
    proc = procs.start(wrap_argv() + pvhguest.qemu_argv(elf, 1), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        _until(proc.stdout, "W", lines)                           # the guest runs
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        procs.kill_group(proc)
    assert "terminating on signal 15" in err                     # QEMU got it
    assert proc.returncode == 0                                  # and QEMU's code is ours


def test_audit_mode_logs_what_would_be_denied_and_lets_it_happen(tmp_path, basic_guest, unwrapped):
    _, elf = basic_guest
    pol = policy(tmp_path, '[policy]\ndefault = "allow"\n[[rule]]\nmsr = 0x174\naccess = "write"\n'
                           'action = "deny"\nlog = true\n')
    audit = tmp_path / "a.jsonl"
    r = run(wrap_argv("--policy", str(pol), "--audit", str(audit), "--mode", "audit")
            + pvhguest.qemu_argv(elf, 2))
    assert r.returncode == pvhguest.EXIT_OK, r.stderr
    out = pvhguest.parse(r.stdout)
    for v in (0, 1):
        assert out[(v, 0x174, 1)][1] == 0                        # the write happened ...
        assert out[(v, 0x174, 0)] == (0x10, 0)                   # ... as KVM would do it
    recs = [x for x in audit_records(audit) if x["msr"] == "0x174"]
    assert sorted(x["vcpu"] for x in recs) == [0, 1]
    assert all(x["action"] == "deny" and "would #GP" in x["result"] for x in recs)


def test_unlogged_decisions_are_counted_per_msr(tmp_path, basic_guest):
    """Decisions that are not logged are summed by the vCPUs in shared memory and still show
    in the run-end counters (as `kvmgate run` prints them)."""
    _, elf = basic_guest
    pol = policy(tmp_path, '[policy]\ndefault = "allow"\nlog = false\n[[rule]]\nmsr = 0xce\n'
                           'access = "read"\naction = "constant"\nvalue = 0x77\n')
    r = run(wrap_argv("--policy", str(pol), "--json") + pvhguest.qemu_argv(elf, 2))
    assert r.returncode == pvhguest.EXIT_OK, r.stderr
    summary = json.loads(r.stderr.strip().splitlines()[-1])
    rows = [d for d in summary["decisions"] if d["msr"] == "0xce"]
    assert rows == [{"msr": "0xce", "name": rows[0]["name"], "access": "read", "action": "constant",
                     "result": "read 0x77", "count": 2, "unlogged": 0}]
    assert summary["exits"]["policy"] == 2 and summary["audit"]["written"] == 0


class Qmp:
    """A minimal QMP client: one command at a time, events skipped."""

    def __init__(self, path: Path):
        import socket
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(path))
        self.f = self.sock.makefile("rw")
        json.loads(self.f.readline())                 # greeting
        self("qmp_capabilities")

    def __call__(self, cmd: str):
        self.f.write(json.dumps({"execute": cmd}) + "\n")
        self.f.flush()
        while True:
            msg = json.loads(self.f.readline())
            if "return" in msg or "error" in msg:
                assert "error" not in msg, msg
                return msg["return"]

    def close(self):
        self.f.close()
        self.sock.close()


def test_monitor_stop_cont_reset_quit_while_the_policy_answers(tmp_path):
    """The guest spins on an MSR the shim answers (never returning to QEMU): QEMU's kicks
    still get its vCPUs out for stop, cont, system_reset (the guest starts again) and quit.
    Each step waits until the shim has answered the spin (the decision counter on the metrics
    port rises): a "W" on the serial port alone does not say the vCPU got that far."""
    from .test_wrap_metrics import Lines, decisions, scrape
    elf = pvhguest.build([(0x40001234, 0, 0)], tmp_path, vcpus=2, wait=2)
    pol = policy(tmp_path, '[policy]\ndefault = "allow"\n[[rule]]\nmsr = 0x40001234\n'
                           'access = "read"\naction = "constant"\nlog = false\nvalue = 1\n')
    sock = tmp_path / "qmp.sock"
    argv = [a for a in pvhguest.qemu_argv(elf, 2) if a != "-no-reboot"]   # reset = reboot
    argv += ["-qmp", f"unix:{sock},server=on,wait=off"]
    proc = procs.start(wrap_argv("--policy", str(pol), "--metrics-port", "0", "--json") + argv,
                       cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = Lines(proc)

    def answered_more_than(url, n):
        deadline = time.monotonic() + TIMEOUT
        while (got := decisions(scrape(url))) <= n:
            assert time.monotonic() < deadline, f"the shim answered no spin: {''.join(lines.seen)}"
            time.sleep(0.01)
        return got

    qmp = None
    try:
        url = re.search(r"(http://\S+/metrics)", lines.wait("stderr", "metrics on")).group(1)
        lines.wait("stdout", "W")
        answered_more_than(url, 0)
        qmp = Qmp(sock)
        qmp("stop")
        assert qmp("query-status")["status"] == "paused"
        qmp("cont")
        assert qmp("query-status")["status"] == "running"
        before = answered_more_than(url, 0)
        qmp("system_reset")
        lines.wait("stdout", "W")                    # the guest booted again and spins again
        answered_more_than(url, before)
        qmp("quit")
        proc.wait(timeout=TIMEOUT)
        summary = json.loads(lines.wait("stderr", r'^\{.*"exits"'))
    finally:
        if qmp is not None:
            qmp.close()
        procs.kill_group(proc)
    assert proc.returncode == 0, "".join(lines.seen)
    assert summary["exits"]["policy"] > before


def test_learn_on_qemu_then_the_learned_policy_changes_nothing(tmp_path, basic_guest, unwrapped):
    """--learn records kernel-handled accesses (kvm:kvm_msr) and the ones QEMU answers itself
    (0x35, which the tracepoint never sees); the guest then runs under the learned policy with
    exactly the unwrapped outcomes and no denial except the #GPs KVM itself gave."""
    _, elf = basic_guest
    learned = tmp_path / "learned.toml"
    r = run(wrap_argv("--learn", str(learned)) + pvhguest.qemu_argv(elf, 2))
    assert r.returncode == pvhguest.EXIT_OK, r.stderr
    assert pvhguest.parse(r.stdout) == unwrapped                  # learning changed nothing
    text = learned.read_text()
    assert "MSR_CORE_THREAD_COUNT" in text and "IA32_EFER" in text and "IA32_SYSENTER_CS" in text
    audit = tmp_path / "a.jsonl"
    r = run(wrap_argv("--policy", str(learned), "--audit", str(audit)) + pvhguest.qemu_argv(elf, 2))
    assert r.returncode == pvhguest.EXIT_OK, r.stderr
    assert pvhguest.parse(r.stdout) == unwrapped
    denied = {x["msr"] for x in audit_records(audit) if x["result"] == "#GP"}
    assert denied <= {"0x12345678", "0xce"}                      # only what KVM itself refused
    assert all(unwrapped[(v, int(m, 16), op)][1] == 1 for m in denied for v in (0, 1)
               for op in (0, 1) if (v, int(m, 16), op) in unwrapped)


def test_merge_with_qemus_filter_inside_a_policy_range(tmp_path, unwrapped):
    """The policy's READ|WRITE range 0x30..0x38 holds QEMU's 0x35 read range: the merge splits
    it (reads differ from writes there), QEMU still answers 0x35, the policy denies 0x30 and
    0x38, and 0x36 (allowed by both) is KVM's own business (#GP, no exit, no record)."""
    acc = [(0x30, 0, 0), (0x35, 0, 0), (0x36, 0, 0), (0x38, 0, 0), (0x38, 1, 1)]
    elf = pvhguest.build(acc, tmp_path, vcpus=2)
    pol = policy(tmp_path, '[policy]\ndefault = "allow"\n[[rule]]\nmsrs = [0x30, 0x38]\n'
                           'access = "both"\naction = "deny"\nlog = true\n')
    audit = tmp_path / "a.jsonl"
    r = run(wrap_argv("--policy", str(pol), "--audit", str(audit), "--json") + pvhguest.qemu_argv(elf, 2))
    assert r.returncode == pvhguest.EXIT_OK, r.stderr
    out = pvhguest.parse(r.stdout)
    for v in (0, 1):
        assert out[(v, 0x35, 0)] == unwrapped[(v, 0x35, 0)]
        assert out[(v, 0x30, 0)][1] == out[(v, 0x36, 0)][1] == out[(v, 0x38, 1)][1] == 1
    recs = {(x["vcpu"], x["msr"], x["access"], x["action"]) for x in audit_records(audit)}
    assert recs == {(v, m, a, "deny") for v in (0, 1)
                    for m, a in (("0x30", "read"), ("0x38", "read"), ("0x38", "write"))}
    assert json.loads(r.stderr.strip().splitlines()[-1])["exits"]["vmm"] == 2


GUEST_PROGRAMS = [ROOT / "kvmgate" / "examples" / "probe.S",
                  *sorted((ROOT / "tests" / "qemu" / "guests").glob("*.S"))]


@pytest.mark.parametrize("program", GUEST_PROGRAMS, ids=lambda p: p.name)
def test_guest_programs_same_under_allow_all_wrap(tmp_path, program):
    """Every guest program the project boots under QEMU (kvmgate image): wrapped with the
    allow-all policy, each vCPU ends exactly as unwrapped (registers, RIP, RFLAGS, #GP list)."""
    from kvmgate.image import build_image, run_qemu, vcpu_outcome
    vcpus = 2 if "two_vcpus" in program.name else 1
    image = build_image(program, tmp_path / "g.img", vcpus=vcpus)
    plain = run_qemu(image, vcpus, timeout=TIMEOUT)
    wrapped = run_qemu(image, vcpus, timeout=TIMEOUT, prefix=wrap_argv())
    assert [vcpu_outcome(v) for v in wrapped.vcpus] == [vcpu_outcome(v) for v in plain.vcpus]
    assert len(plain.vcpus) == vcpus
