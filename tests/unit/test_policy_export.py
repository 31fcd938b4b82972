"""`kvmgate policy export --format kvm-filter-json`: the document, its schema, the round trip
of the bitmaps, and bad input (exit 2 naming file and line, nothing written)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from kvmgate.errors import PolicyError
from kvmgate.msr.model import READ, WRITE
from kvmgate.policy import compile_policy, load_policy, parse_policy
from kvmgate.policy.export import FORMAT, VERSION, export_kvm_filter, export_text, load_export
from kvmgate.schemas import schema

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "kvmgate" / "examples" / "deny-by-default.toml"


def kvmgate(*args):
    return subprocess.run([sys.executable, "-m", "kvmgate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def _errors(doc):
    return [e.message for e in Draft202012Validator(schema("kvm-filter")).iter_errors(doc)]


def test_example_export_matches_the_compiled_policy_and_the_schema():
    cp = compile_policy(load_policy(EXAMPLE))
    doc = json.loads(export_text(cp))
    assert doc["format"] == FORMAT and doc["version"] == VERSION
    assert _errors(doc) == []
    assert doc["filter"]["flags"] == cp.filter.flags == 1
    assert [(r["flags"], r["base"], r["nmsrs"]) for r in doc["filter"]["ranges"]] == \
        [(r.flags, r.base, r.nmsrs) for r in cp.filter.ranges]
    assert doc["exit_mask"] == cp.exit_mask and doc["exit_reasons"] == ["UNKNOWN", "FILTER"]
    rules = {(r["first"], r["access"]): r for r in doc["actions"]["filter"]["rules"]}
    lstar_w = rules[(0xC0000082, "write")]
    assert lstar_w["action"] == "emulate" and lstar_w["allowed"] == ["0xffffffff81a00000"]
    assert rules[(0x35, "read")]["value"] == "0x10001"
    perf = rules[(0x186, "write")]
    assert (perf["last"], perf["action"], perf["log"]) == (0x189, "ignore", False)
    assert doc["actions"]["filter"]["default"] == {"action": "deny", "log": True, "rule": "[policy] default"}
    assert doc["actions"]["unknown"]["action"] == "deny" and doc["actions"]["invalid"] is None


def test_bitmaps_round_trip():
    text = ("[policy]\ndefault='allow'\n[[rule]]\nrange=[0x100, 0x2ff]\naccess='write'\naction='deny'\n"
            "[[rule]]\nmsrs=[0x13, 0x17, 0x1d]\naction='deny'\nlog=false\n"
            "[[rule]]\nrange=[0xc0010000, 0xc0010fff]\naccess='read'\naction='deny'\n")
    cp = compile_policy(parse_policy(text))
    doc = json.loads(export_text(cp))
    flt, mask = load_export(doc)
    assert flt == cp.filter and mask == cp.exit_mask
    for r, d in zip(cp.filter.ranges, doc["filter"]["ranges"]):
        raw = bytes.fromhex(d["bitmap"])
        assert len(raw) == (r.nmsrs + 7) // 8 and raw == r.bitmap[:len(raw)]
    for index in (0x13, 0x14, 0x17, 0x100, 0x2ff, 0x300, 0xc0010000, 0xc0010fff, 0xc0011000):
        for access in (READ, WRITE):
            assert flt.allows(index, access) == cp.filter.allows(index, access)


def test_cli_writes_stdout_and_file(tmp_path):
    r = kvmgate("policy", "export", "--format", "kvm-filter-json", str(EXAMPLE))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "f.json"
    r2 = kvmgate("policy", "export", "--format", "kvm-filter-json", str(EXAMPLE), "-o", str(out))
    assert r2.returncode == 0 and "3/16 filter ranges" in r2.stderr
    assert json.loads(r.stdout) == json.loads(out.read_text())
    assert _errors(json.loads(out.read_text())) == []
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]           # no temporary left


@pytest.mark.parametrize("content,where", [
    ("[policy]\ndefault = 'nope'\n", "bad.toml:2"),
    ("[[rule]]\nmsr = 'NO_SUCH_MSR'\naction = 'deny'\n", "bad.toml:2"),
    ("[[rule]]\nmsr = 0x830\naction = 'deny'\n", "bad.toml:1"),            # x2APIC: not enforceable
])
def test_bad_policy_exits_2_with_file_and_line_and_writes_nothing(tmp_path, content, where):
    f, out = tmp_path / "bad.toml", tmp_path / "f.json"
    f.write_text(content)
    r = kvmgate("policy", "export", "--format", "kvm-filter-json", str(f), "-o", str(out))
    assert r.returncode == 2 and where in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("args,what", [
    (["--format", "xml"], "--format"),
    ([], "--format"),
    (["--format", "kvm-filter-json", "-o", "/nonexistent-dir/f.json"], "does not exist"),
])
def test_bad_arguments_exit_2(args, what):
    r = kvmgate("policy", "export", str(EXAMPLE), *args)
    assert r.returncode == 2 and what in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("mutate,why,in_schema", [
    (lambda d: d.update(version=2), "version", True),
    (lambda d: d["filter"]["ranges"][0].update(bitmap="zz"), "hex", True),
    (lambda d: d["filter"]["ranges"][0].update(bitmap="00"), "bytes", False),  # length vs nmsrs
    (lambda d: d["filter"]["ranges"][0].update(flags=0), "flags", True),
    (lambda d: d.update(exit_mask=8), "exit_mask", True),
    (lambda d: d["filter"].update(flags=2), "DEFAULT_DENY", True),
])
def test_load_export_refuses_malformed_documents(mutate, why, in_schema):
    doc = export_kvm_filter(compile_policy(load_policy(EXAMPLE)))
    doc = json.loads(json.dumps(doc))
    mutate(doc)
    with pytest.raises((PolicyError, OSError), match=why):
        load_export(doc)
    assert (_errors(doc) != []) == in_schema
