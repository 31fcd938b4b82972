"""`kvmgate trace` and `kvmgate learn` on the running kernel: record (Ctrl-C ends it cleanly),
learn then run and replay, and replay verdicts equal to the live kernel's for the same policy."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kvmgate.msr.model import KernelMsr

from kvmgate.probe import Access, MsrProber

from kvmgate.audit import AuditLog
from kvmgate.trace.dryrun import replay_policy
from kvmgate.hostinfo import ignore_msrs
from kvmgate.learn import learn
from kvmgate.machine import Machine
from kvmgate.msr.model import EXIT_REASON_FILTER
from kvmgate.policy import compile_policy, parse_policy
from kvmgate.trace import Recording, collect, load_trace

from ..unit.test_cli_trace import ENTRY, EXAMPLES, ROOT, kvmgate

pytestmark = pytest.mark.kvm

PROBE = EXAMPLES / "probe.S"

# each (MSR, direction) once: handled, read-only, unknown, invalid, x2APIC, feature MSRs
READS = [0x10, 0x1B, 0xC0000080, 0x3B, 0x1A0, 0x35, 0x4B564DFF, 0x808, 0xFE, 0x10A, 0x17B, 0x174]
WRITES = [(0xFE, 0), (0xC0000082, 0xFFFFFFFF81A00000), (0x186, 0x1234), (0x3B, 0), (0x4B564DFF, 7),
          (0x808, 0), (0x174, 0x10), (0x35, 1), (0x1A0, 1), (0x10, 0x1000)]
KEYS = {(i, False) for i in READS} | {(i, True) for i, _ in WRITES}


def _guest() -> str:
    lines = []
    for i in READS:
        lines += [f"mov ecx, {i:#x}", "rdmsr"]
    for i, v in WRITES:
        lines += [f"mov ecx, {i:#x}", f"mov eax, {v & 0xFFFFFFFF:#x}", f"mov edx, {v >> 32:#x}", "wrmsr"]
    return "\n".join(lines + ["hlt"])


GUEST = _guest()

POLICIES = {
    "example": (EXAMPLES / "deny-by-default.toml").read_text(),
    "allow-with-actions": """
[policy]
default = "allow"
[[rule]]
msrs = ["IA32_APIC_BASE", 0x4b564dff]
access = "read"
action = "deny"
[[rule]]
msr = 0x35
action = "constant"
value = 5
writes = "gp"
[[rule]]
msr = "IA32_TSC_ADJUST"
action = "emulate"
[[rule]]
msr = 0xfe
access = "write"
action = "ignore"
[[rule]]
msrs = ["IA32_MISC_ENABLE", "IA32_SYSENTER_CS"]
action = "allow"
log = true
[invalid]
action = "ignore"
log = true
[unknown]
action = "gp"
log = true
""",
    "quiet-deny": """
[policy]
default = "deny"
log = false
[[rule]]
msrs = ["IA32_TSC", "IA32_EFER", 0x4b564dff, 0x10a]
action = "allow"
""",
}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """GUEST recorded once with no filter and no user-space exits, saved as a Parquet trace."""
    path = tmp_path_factory.mktemp("trace") / "guest.parquet"
    with Machine(GUEST) as m, Recording(pid=os.getpid()) as rec:
        m.run(timeout=30)
    rec.trace.save(path)
    return path, rec.trace


def _live(cp):
    """The live kernel's verdict per (MSR, direction): the exit KVM made (reason) and what the
    policy's handler answered, or no exit: "kernel", or "gp" (#GP without an exit)."""
    audit = AuditLog(io.StringIO(), rate=1e9, burst=1 << 20)
    with Machine(GUEST) as m:
        m.set_policy(cp, audit)
        r = m.run(timeout=30)
        gps = {(f.index, m.read_mem(f.rip, 2) == b"\x0f\x30") for f in r.gp_faults}
    exits = {}
    for ex in r.msr_exits:
        assert (ex.index, bool(ex.is_write)) not in exits
        exits[(ex.index, bool(ex.is_write))] = ex
    assert set(exits) <= KEYS and gps <= KEYS
    out = {}
    for key in KEYS:
        ex = exits.get(key)
        if ex is None:
            out[key] = "gp" if key in gps else "kernel"
            continue
        act = cp.action_for(key[0], key[1], ex.reason)
        if ex.reason == EXIT_REASON_FILTER:
            denied = act is None or act.kind == "deny" or (act.kind == "constant" and ex.reply == "gp")
            out[key] = "deny" if denied else act.kind
        else:
            out[key] = "gp-kernel" if ex.reply == "gp" else act.kind
    return out


def _same(predicted, live):
    """Equal, where a #GP that made no exit may be either the filter's or KVM's own."""
    assert set(predicted) == set(live)
    diff = {k: (predicted[k], live[k]) for k in live
            if not (predicted[k] == live[k] or live[k] == "gp" and predicted[k] in ("deny", "gp-kernel"))}
    assert diff == {}


def test_trace_has_every_access_once(recorded):
    _, trace = recorded
    keys = [(i, w) for _, _, i, w, _, _ in trace.events()]
    assert sorted(keys) == sorted(KEYS)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_replay_verdicts_equal_live_kernel(recorded, tmp_path, name):
    """Record with no filter; replay the trace with a policy; run the same guest live under it."""
    if ignore_msrs() and "[unknown]" in POLICIES[name]:
        pytest.skip("kvm.ignore_msrs=Y: [unknown] rules cannot be enforced here")
    path, _ = recorded
    pol = tmp_path / f"{name}.toml"
    pol.write_text(POLICIES[name])
    rep, cp = replay_policy(pol, path, classify=True)
    predicted = {(r.index, r.write): r.verdict() for r in rep.rows}
    live = _live(cp)
    _same(predicted, live)
    assert len(set(live.values())) >= 2
    # the command line says the same
    r = kvmgate("trace", "replay", "--policy", pol, path, "--classify", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    cli = {(int(x["index"], 16), x["access"] == "write"): next(iter(x["verdicts"])) for x in d["rows"]}
    assert cli == predicted
    assert {(int(x["msr"], 16), x["access"] == "write") for x in d["denied"]} == \
        {k for k, v in predicted.items() if v == "deny"}


def test_replay_verdicts_equal_live_kernel_for_the_learned_policy(recorded):
    path, _ = recorded
    for recorder in ("tracefs", "exits"):
        res = learn(GUEST, recorder=recorder)
        cp = compile_policy(parse_policy(res.policy_text()))
        live = _live(cp)
        from kvmgate.trace import policy_decider, replay
        rep = replay(path, policy_decider(cp))
        predicted = {(r.index, r.write): r.verdict() for r in rep.rows}
        _same(predicted, live)
        # what the guest could use stays usable; what KVM failed is denied (same #GP as before)
        assert {k for k, v in live.items() if v == "kernel"} == {(a.index, a.write) for a in res.allowed()
                                                                 if not 0x800 <= a.index <= 0x8FF}
        assert {k for k, v in live.items() if v in ("deny", "gp", "gp-kernel")} == \
            {(a.index, a.write) for a in res.refused()}


def test_ambiguous_kernel_failures_without_classify(recorded, tmp_path):
    path, _ = recorded
    pol = tmp_path / "p.toml"
    pol.write_text(POLICIES["allow-with-actions"])
    rep, _ = replay_policy(pol, path)
    v = {(r.index, r.write): r.verdict() for r in rep.rows}
    assert v[(0x17B, False)] == "gp-kernel|ignore"           # unknown -> gp, invalid -> ignore
    rep, _ = replay_policy(pol, path, classify=True)
    v = {(r.index, r.write): r.verdict() for r in rep.rows}
    kind = MsrProber().classify([Access(0x17B)])[0]         # the kernel's own answer here
    assert v[(0x17B, False)] == {KernelMsr.UNKNOWN: "gp-kernel", KernelMsr.INVALID: "ignore"}[kind]


# ---- commands

def _flushed_events(parts, want, timeout=60.0):
    """Wait until the recorder's part files hold `want` events (a condition, polled; no fixed
    sleep): the number it found."""
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        if parts.is_dir() and any(parts.glob("part-*.parquet")):
            n = collect([parts]).events
            if n >= want:
                return n
        time.sleep(0.05)
    return n


GUEST2 = "mov ecx, 0x10\nrdmsr\nmov ecx, 0x4b564dfe\nrdmsr\nhlt"
WANT2 = [(0x10, False, False), (0x4B564DFE, False, True)]


def _recorder(out, *extra):
    return subprocess.Popen([sys.executable, *ENTRY, "trace", "record", "--pid", str(os.getpid()),
                             "--out", str(out), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_trace_record_until_ctrl_c(tmp_path):
    out = tmp_path / "rec.parquet"
    p = _recorder(out, "--flush-seconds", "0.1")
    try:
        banner = p.stderr.readline()
        assert "recording kvm:kvm_msr" in banner and "Ctrl-C" in banner, banner
        with Machine(GUEST2) as m:
            m.run(timeout=10)
        assert _flushed_events(tmp_path / "rec.parquet.parts", 2) == 2
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0 and "Traceback" not in err, err
    assert "recorded 2 events" in err and "stopped by a signal" in err
    t = load_trace(out)
    assert [(i, w, e) for _, _, i, w, _, e in t.events()] == WANT2
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "rec.parquet.parts").exists()


def test_trace_record_killed_keeps_what_it_flushed(tmp_path):
    """SIGKILL a recording: the events flushed before it died are in OUT.parts, replayable
    (reported as partial) and learnable."""
    out = tmp_path / "rec.parquet"
    p = _recorder(out, "--flush-seconds", "0.1")
    try:
        assert "recording kvm:kvm_msr" in p.stderr.readline()
        with Machine(GUEST2) as m:
            m.run(timeout=10)
        assert _flushed_events(tmp_path / "rec.parquet.parts", 2) == 2
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -signal.SIGKILL and not out.exists()
    parts = tmp_path / "rec.parquet.parts"
    t = load_trace(parts)
    assert [(i, w, e) for _, _, i, w, _, e in t.events()] == WANT2
    pol = EXAMPLES / "deny-by-default.toml"
    r = kvmgate("trace", "replay", "--policy", pol, parts, "--json")
    assert r.returncode == 3 and "unfinished recording" in r.stderr and "Traceback" not in r.stderr
    assert json.loads(r.stdout)["events"] == 2
    r = kvmgate("trace", "record", "--pid", os.getpid(), "--duration", "0", "--out", out)
    assert r.returncode == 2 and "unfinished recording" in r.stderr


def test_trace_record_duration(tmp_path):
    out = tmp_path / "d.parquet"
    r = kvmgate("trace", "record", "--pid", os.getpid(), "--duration", "0.3", "--out", out)
    assert r.returncode == 0 and "duration reached" in r.stderr and len(load_trace(out)) == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    r = kvmgate("trace", "record", "--pid", dead.pid, "--duration", "1", "--out", out)
    assert r.returncode == 2 and str(dead.pid) in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("recorder", ["tracefs", "exits"])
def test_learn_then_run_and_replay(tmp_path, recorder):
    with Machine(PROBE.read_text()) as m:
        base = len(m.run(timeout=30).gp_faults)
    pol, tr = tmp_path / "p.toml", tmp_path / "p.parquet"
    r = kvmgate("learn", PROBE, "--out", pol, "--trace-out", tr, "--recorder", recorder, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["recorder"] == recorder and d["halted"] and d["gp_faults"] == base
    refused = {(int(a["msr"], 16), a["access"]) for a in d["accesses"] if not a["allowed"]}
    assert d["refused"] == len(refused) and d["policy_file"] == str(pol)
    # `kvmgate run` under the learned policy: the same #GPs as with none, all logged denials
    audit = tmp_path / "audit.jsonl"
    r = subprocess.run([sys.executable, "-m", "kvmgate", "run", "--policy", str(pol), str(PROBE),
                        "--audit", str(audit), "--json"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["gp_faults"] == base
    recs = [json.loads(line) for line in audit.read_text().splitlines()]
    assert {(int(x["msr"], 16), x["access"]) for x in recs} == refused
    assert {x["action"] for x in recs} == {"deny"}
    # replaying the learned trace against the learned policy: denied = refused
    r = kvmgate("trace", "replay", "--policy", pol, tr, "--json")
    assert r.returncode == 0, r.stderr
    assert {(int(x["msr"], 16), x["access"]) for x in json.loads(r.stdout)["denied"]} == refused
    # the text output
    r = kvmgate("learn", PROBE, "--out", pol, "--recorder", recorder)
    assert r.returncode == 0 and f"wrote {pol}" in r.stdout and "IA32_EFER" in r.stdout
