"""`kvmgate trace ...` and `kvmgate learn` without a kernel: argument and file mistakes exit 2
with no traceback; import and replay of a trace-cmd text report; damaged traces refused, an
unfinished recording reported; fleet replay and learn --from-trace; the policy verdicts.

The commands run as `python -m kvmgate ...`."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvmgate.cli import build_parser, main
from kvmgate.cli import learn as cli_learn, trace as cli_trace
from kvmgate.msr.model import KernelMsr
from kvmgate.policy import compile_policy, load_policy, parse_policy
from kvmgate.trace import Trace, TraceWriter, policy_decider
from kvmgate.trace.policy import verdict

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "kvmgate" / "examples"

ENTRY = ["-m", "kvmgate"]


def kvmgate(*args, **kw):
    return subprocess.run([sys.executable, *ENTRY, *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, **kw)


def bad(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    for n in needles:
        assert n in r.stderr, r.stderr


REPORT = """\
# tracer: nop
cpus=4
 CPU 0/KVM-1240  [003]  5678.901234: kvm_msr:              msr_read 10 = 0x1234
 CPU 0/KVM-1240  [003]  5678.901240: kvm_msr:              msr_read 1a0 = 0x1
 CPU 0/KVM-1240  [003]  5678.901241: kvm_msr:              msr_read 1a0 = 0x1
 CPU 0/KVM-1240  [003]  5678.901250: kvm_msr:              msr_write c0000082 = 0xffffffff81a00000
 CPU 0/KVM-1240  [003]  5678.901251: kvm_msr:              msr_write c0000082 = 0xdeadbeef
 CPU 0/KVM-1240  [003]  5678.901260: kvm_msr:              msr_read 35 = 0x0 (#GP)
 CPU 1/KVM-1241  [001]  5678.901270: kvm_msr:              msr_read 12345678 = 0x0 (#GP)
 CPU 1/KVM-1241  [001]  5678.901271: kvm_exit:             reason MSR_READ rip 0x1000
 CPU 1/KVM-1241  [001]  5678.901280: kvm_msr:              msr_write 186 = 0x1234
 CPU 1/KVM-1241  [001]  5678.901290: kvm_msr:              msr_bogus
"""


@pytest.fixture
def imported(tmp_path):
    src = tmp_path / "report.txt"
    src.write_text(REPORT)
    out = tmp_path / "t.parquet"
    r = kvmgate("trace", "import", src, "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)


def test_import_report(imported):
    out, stats = imported
    assert stats["events"] == 8 and stats["skipped_events"] == {"kvm_exit": 1}
    assert stats["malformed"] == 1 and out.exists()


def test_replay_table_and_json(imported, tmp_path):
    out, _ = imported
    pol = EXAMPLES / "deny-by-default.toml"
    r = kvmgate("trace", "replay", "--policy", pol, out, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["events"] == 8
    assert d["totals"] == {"kernel": 1, "deny": 3, "emulate": 2, "constant": 1, "ignore": 1}
    assert [(x["msr"], x["name"], x["access"], x["count"]) for x in d["denied"]] == [
        ("0x1a0", "IA32_MISC_ENABLE", "read", 2), ("0x12345678", "", "read", 1)]
    assert d["denied_events"] == 3 and d["kernel_gp"] == []
    r = kvmgate("trace", "replay", "--policy", pol, out)
    assert r.returncode == 0 and "would be denied by the policy: 3 events, 2 MSR/direction rows" in r.stdout
    assert "IA32_MISC_ENABLE" in r.stdout
    r = kvmgate("trace", "replay", "--policy", pol, out, "--fail-on-deny")
    assert r.returncode == 1
    allow_all = tmp_path / "allow.toml"
    allow_all.write_text("[policy]\ndefault = 'allow'\n")
    r = kvmgate("trace", "replay", "--policy", allow_all, out, "--fail-on-deny", "--json")
    d = json.loads(r.stdout)
    assert r.returncode == 0 and d["totals"] == {"kernel": 6, "gp-kernel": 2}
    assert {x["msr"] for x in d["kernel_gp"]} == {"0x35", "0x12345678"}


def test_bad_arguments_and_files_exit_2(tmp_path, imported):
    out, _ = imported
    pol = EXAMPLES / "deny-by-default.toml"
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00\xff" * 100)
    badpol = tmp_path / "bad.toml"
    badpol.write_text("[policy]\ndefault = 'maybe'\n")
    bad(kvmgate("trace"))
    bad(kvmgate("trace", "frobnicate"))
    bad(kvmgate("trace", "record"), "--out")
    bad(kvmgate("trace", "record", "--duration", "soon", "--out", tmp_path / "x"), "duration")
    bad(kvmgate("trace", "record", "--duration", "-1", "--out", tmp_path / "x"), "duration")
    bad(kvmgate("trace", "record", "--pid", "0", "--out", tmp_path / "x"), "process id")
    bad(kvmgate("trace", "record", "--duration", "1", "--out", tmp_path / "no" / "x"), "does not exist")
    bad(kvmgate("trace", "record", "--duration", "1", "--out", tmp_path), "is a directory")
    bad(kvmgate("trace", "import", tmp_path / "missing.txt", "--out", tmp_path / "x"), "missing.txt")
    bad(kvmgate("trace", "import", garbage, "--out", tmp_path / "x"), "no trace events")
    bad(kvmgate("trace", "import", EXAMPLES / "probe.S", "--out", tmp_path / "x"), "no trace events")
    assert not (tmp_path / "x").exists()
    bad(kvmgate("trace", "replay", out), "--policy")
    bad(kvmgate("trace", "replay", "--policy", tmp_path / "nope.toml", out), "nope.toml")
    bad(kvmgate("trace", "replay", "--policy", badpol, out), "bad.toml:2")
    bad(kvmgate("trace", "replay", "--policy", pol, tmp_path / "nope.parquet"), "nope.parquet")
    bad(kvmgate("trace", "replay", "--policy", pol, garbage), "not a Parquet trace file")
    empty = tmp_path / "empty"
    empty.mkdir()
    bad(kvmgate("trace", "replay", "--policy", pol, empty), "no *.parquet")
    bad(kvmgate("trace", "replay", "--policy", pol, out, "--dask", "nonsense"), "--dask")
    bad(kvmgate("trace", "replay", "--policy", pol, out, "--dask", "local:0"), "--dask")
    bad(kvmgate("trace", "import", "/dev/zero", "--out", tmp_path / "x"), "not a regular file")
    bad(kvmgate("trace", "record", "--flush-seconds", "0", "--out", tmp_path / "x"), "flush-seconds")
    bad(kvmgate("learn"), "--out")
    bad(kvmgate("learn", "--out", tmp_path / "p.toml"), "--from-trace")
    bad(kvmgate("learn", EXAMPLES / "probe.S", "--from-trace", out, "--out", tmp_path / "p.toml"), "not both")
    bad(kvmgate("learn", "--from-trace", garbage, "--out", tmp_path / "p.toml"), "not a Parquet")
    bad(kvmgate("learn", tmp_path / "missing.S", "--out", tmp_path / "p.toml"), "cannot read guest")
    bad(kvmgate("learn", EXAMPLES / "probe.S", "--out", tmp_path / "p.toml", "--recorder", "x"), "recorder")
    bad(kvmgate("learn", EXAMPLES / "probe.S", "--out", tmp_path / "p.toml", "--timeout", "x"), "timeout")
    bad(kvmgate("learn", EXAMPLES / "probe.S", "--out", tmp_path / "p.toml", "--vcpus", "0"), "vcpus")
    bad(kvmgate("learn", EXAMPLES / "probe.S", "--out", tmp_path / "no" / "p.toml"), "does not exist")
    asm = tmp_path / "bad.S"
    asm.write_text("mov ecx, 0x10\nfrobnicate eax\nhlt\n")
    bad(kvmgate("learn", asm, "--out", tmp_path / "p.toml"), "line 2", "assemble")
    assert not (tmp_path / "p.toml").exists()


def test_main_in_process(capsys, tmp_path):
    assert main(["trace", "replay", "--policy", str(tmp_path / "x.toml"), "t"]) == 2
    assert "x.toml" in capsys.readouterr().err
    assert main(["nope"]) == 2
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["trace", "record"])
    assert e.value.code == 2


def test_register_into_a_parser():
    ap = argparse.ArgumentParser(prog="kvmgate")
    sub = ap.add_subparsers(dest="cmd", required=True)
    cli_trace.register(sub)
    cli_learn.register(sub)
    a = ap.parse_args(["trace", "replay", "--policy", "p.toml", "t.parquet", "d/", "--json", "--by-host"])
    assert a.fn.__name__ == "cmd_trace_replay" and a.json and a.policy == "p.toml"
    assert a.trace == ["t.parquet", "d/"] and a.by_host and a.dask is None and not a.accept_partial
    a = ap.parse_args(["learn", "--from-trace", "a.parquet", "b", "--out", "p.toml", "--dask", "local:2"])
    assert a.from_trace == ["a.parquet", "b"] and a.guest is None and a.dask == "local:2"
    a = ap.parse_args(["learn", "g.S", "--out", "p.toml", "--recorder", "exits"])
    assert a.fn.__name__ == "cmd_learn" and a.recorder == "exits" and a.timeout == 60.0
    a = ap.parse_args(["trace", "record", "--pid", "1", "--duration", "2.5", "--out", "x"])
    assert (a.pid, a.duration, a.out) == (1, 2.5, "x")


# ---- verdicts (kvmgate.trace.policy), checked against the example policy's documented intent

def test_verdicts_of_the_example_policy():
    cp = compile_policy(load_policy(EXAMPLES / "deny-by-default.toml"))
    d = policy_decider(cp)
    assert d(0x10, False, False) == "kernel" and d(0x10, True, False) == "kernel"
    assert d(0xC0000082, False, False) == "kernel"            # LSTAR reads allowed
    assert d(0xC0000082, True, False) == "emulate"
    assert d(0x35, False, False) == "constant"
    assert d(0x35, True, False) == "deny"                      # only reads listed
    assert d(0x186, True, False) == d(0x189, False, False) == "ignore"
    assert d(0x1A0, False, False) == "deny" and d(0x12345678, False, True) == "deny"
    assert d(0x10, True, True) == "gp-kernel"                  # allowed, KVM #GPs it itself
    assert d(0x808, False, False) == "kernel"                  # x2APIC: never filtered
    assert d(0x808, False, True) == "gp-kernel"


def test_verdicts_unknown_vs_invalid_and_special_cases():
    cp = compile_policy(parse_policy("""
[policy]
default = "allow"
[[rule]]
msr = 0x35
action = "constant"
value = 7
writes = "gp"
[[rule]]
msr = 0x1a0
action = "allow"
log = true
[[rule]]
msr = 0x1b
action = "deny"
log = false
[invalid]
action = "ignore"
"""))
    d = policy_decider(cp)
    assert d(0x35, False, False) == "constant" and d(0x35, True, False) == "deny"
    assert d(0x1A0, False, False) == "forward" and d(0x1B, True, False) == "deny"
    assert d(0x10, False, True) == "gp-kernel|ignore"          # the trace cannot tell which
    k = policy_decider(cp, lambda i, w: KernelMsr.UNKNOWN)
    assert k(0x10, False, True) == "gp-kernel"
    k = policy_decider(cp, lambda i, w: KernelMsr.INVALID)
    assert k(0x10, False, True) == "ignore"
    assert verdict(cp, 0x10, False, KernelMsr.UNKNOWN) == "gp-kernel"
    # default deny without logging: the filter's #GP needs no exit
    quiet = compile_policy(parse_policy(
        "[policy]\ndefault='deny'\nlog=false\n[[rule]]\nmsr=0x10\naction='allow'\n"))
    assert quiet.exit_mask == 0
    assert verdict(quiet, 0x11, False) == "deny" and verdict(quiet, 0x10, False) == "kernel"


# ---- damaged and partial traces, fleets, learn --from-trace

def test_damaged_trace_refused_with_one_line(imported, tmp_path):
    out, _ = imported
    pol = EXAMPLES / "deny-by-default.toml"
    data = out.read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(data[:len(data) // 2])
    r = kvmgate("trace", "replay", "--policy", pol, cut)
    bad(r, "truncated", "cut.parquet")
    assert len(r.stderr.strip().splitlines()) == 1
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    (tmp_path / "flip.parquet").write_bytes(bytes(flipped))
    r = kvmgate("trace", "replay", "--policy", pol, out, tmp_path / "flip.parquet")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "flip.parquet" in r.stderr, r.stderr


def _unfinished(tmp_path):
    """A crash-safe writer abandoned after two flushes (as a killed recorder leaves it)."""
    out = tmp_path / "rec.parquet"
    w = TraceWriter(out, crash_safe=True, flush_seconds=3600, host="vm1")
    for k in range(2):
        w.append([0x10, 0x1A0, 0x12345678], [False, False, False], exception=[False, False, True])
        w.flush()
    return tmp_path / "rec.parquet.parts"


def test_unfinished_recording_is_partial(tmp_path):
    parts = _unfinished(tmp_path)
    pol = EXAMPLES / "deny-by-default.toml"
    r = kvmgate("trace", "replay", "--policy", pol, parts, "--json")
    assert r.returncode == 3, r.stderr
    assert "partial trace" in r.stderr and "unfinished recording" in r.stderr and "6 events" in r.stderr
    d = json.loads(r.stdout)
    assert d["events"] == 6 and d["partial"] and all(f["partial"] for f in d["files"])
    r = kvmgate("trace", "replay", "--policy", pol, parts, "--accept-partial")
    assert r.returncode == 0 and "partial trace" in r.stderr and "6 events" in r.stdout
    r = kvmgate("learn", "--from-trace", parts, "--out", tmp_path / "p.toml")
    assert r.returncode == 2 and "--accept-partial" in r.stderr
    r = kvmgate("learn", "--from-trace", parts, "--out", tmp_path / "p.toml", "--accept-partial")
    assert r.returncode == 0, r.stderr
    assert "partial trace" in (tmp_path / "p.toml").read_text()


def _host_trace(d, host, index, write, exc=None):
    d.mkdir(exist_ok=True)
    Trace.from_arrays(index, write, exception=exc, host=host).save(d / "t.parquet")


def test_fleet_replay_by_host_and_learn_union(tmp_path):
    _host_trace(tmp_path / "a", "a", [0x10, 0x10, 0x1A0], [False, True, False])
    _host_trace(tmp_path / "b", "b", [0x10, 0xC0000082, 0x12345678], [False, True, False], [False, False, True])
    pol = EXAMPLES / "deny-by-default.toml"
    r = kvmgate("trace", "replay", "--policy", pol, tmp_path / "a", tmp_path / "b", "--by-host", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["events"] == 6 and len(d["files"]) == 2
    assert d["by_host"] == {"a": {"kernel": 2, "deny": 1}, "b": {"kernel": 1, "emulate": 1, "deny": 1}}
    assert {(x["host"], x["msr"]) for x in d["denied"]} == {("a", "0x1a0"), ("b", "0x12345678")}
    r = kvmgate("trace", "replay", "--policy", pol, tmp_path / "a", tmp_path / "b", "--by-host")
    assert r.returncode == 0 and "per host:" in r.stdout and "from 2 hosts" in r.stdout
    # learn: the union of both VMs, rendered like `kvmgate learn`
    r = kvmgate("learn", "--from-trace", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "p.toml", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["recorder"] == "trace" and d["hosts"] == ["a", "b"] and d["events"] == 6
    cp = compile_policy(load_policy(tmp_path / "p.toml"))
    allowed = {(i, w) for i in (0x10, 0x1A0, 0xC0000082, 0x12345678, 0x11)
               for w in (False, True) if cp.filter.allows(i, 2 if w else 1)}
    assert allowed == {(0x10, False), (0x10, True), (0x1A0, False), (0xC0000082, True)}
    assert "0x12345678" in (tmp_path / "p.toml").read_text()       # refused: a comment
    assert cp.policy.name == "learned-from-traces"
