"""The shipped JSON Schemas: bundled policies and real audit records validate; wrong shapes do not."""
import io
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from kvmgate.audit import AuditLog
from kvmgate.msr.model import EXIT_REASON_FILTER, EXIT_REASON_UNKNOWN
from kvmgate.schemas import SCHEMAS, schema

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "kvmgate" / "examples"


@pytest.mark.parametrize("name", SCHEMAS)
def test_schemas_are_valid_json_schema(name):
    Draft202012Validator.check_schema(schema(name))


@pytest.mark.parametrize("name", SCHEMAS)
def test_cli_prints_the_schema(name):
    r = subprocess.run([sys.executable, "-m", "kvmgate", "schema", name], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout) == schema(name)


def _policy_errors(doc):
    return sorted(e.message for e in Draft202012Validator(schema("policy")).iter_errors(doc))


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_bundled_policies_validate(path):
    assert _policy_errors(tomllib.loads(path.read_text())) == []


@pytest.mark.parametrize("doc", [
    {"policy": 5},
    {"policy": {"default": "maybe"}},
    {"rule": [{"msr": "LSTAR"}]},                                  # no action
    {"rule": [{"msr": "LSTAR", "msrs": ["EFER"], "action": "deny"}]},  # two selectors
    {"rule": [{"range": [1], "action": "deny"}]},
    {"rule": [{"msr": 0x1_0000_0000, "action": "deny"}]},
    {"rule": [{"msr": "LSTAR", "action": "deny", "acces": "read"}]},   # misspelt key
    {"unknown": {"action": "allow"}},
    {"policy": {"audit_rate": 0}},
    {"frobnicate": {}},
])
def test_wrong_policies_do_not_validate(doc):
    assert _policy_errors(doc)


def _records(log: AuditLog, out: io.StringIO) -> list[dict]:
    log.close()
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_real_audit_records_validate():
    out = io.StringIO()
    now = [1000.0]
    log = AuditLog(out, rate=1.0, burst=1, clock=lambda: now[0])
    log.record(vcpu=0, rip=0x10010, index=0xC0000082, write=True, value=0xFFFF, reason=EXIT_REASON_FILTER,
               action="deny", result="#GP", rule="p.toml:3 (rule 1)")
    log.record(vcpu=1, rip=None, index=0x1234, write=False, value=0, reason=EXIT_REASON_UNKNOWN,
               action="ignore", result="read 0x0", rule="[unknown]")
    for _ in range(3):                                   # rate limited: a suppressed record at close
        log.record(vcpu=0, rip=0x10020, index=0xC0000082, write=True, value=1, reason=EXIT_REASON_FILTER,
                   action="deny", result="#GP")
    recs = _records(log, out)
    assert len(recs) == 3 and recs[-1]["suppressed"] == 3
    v = Draft202012Validator(schema("audit"))
    assert [sorted(e.message for e in v.iter_errors(r)) for r in recs] == [[], [], []]


@pytest.mark.parametrize("bad", [
    {"schema": 1, "time": 1.0, "vcpu": 0, "rip": "0x1", "msr": "0x10", "name": "IA32_TSC", "access": "read",
     "value": "0x0", "reason": "FILTER", "action": "deny"},                       # no result
    {"time": 1.0, "vcpu": -1, "rip": "0x1", "msr": "0x10", "name": "IA32_TSC", "access": "read",
     "value": "0x0", "reason": "FILTER", "action": "deny", "result": "#GP"},
    {"time": 1.0, "vcpu": 0, "rip": "0x1", "msr": "16", "name": "IA32_TSC", "access": "read",
     "value": "0x0", "reason": "FILTER", "action": "deny", "result": "#GP"},      # msr not hex
    {"schema": 1, "time": 1.0, "msr": "0x10", "name": "IA32_TSC", "access": "read", "suppressed": 0},
    {"time": 1.0, "msr": "0x10", "name": "IA32_TSC", "access": "read", "suppressed": 3},  # no schema
])
def test_wrong_records_do_not_validate(bad):
    assert list(Draft202012Validator(schema("audit")).iter_errors(bad))


def test_audit_mode_records_validate():
    """Audit mode carries out what the policy would deny and says so in the result."""
    from kvmgate.engine.binding import RES_DROPPED, RES_GP, RES_VALUE, RES_WRITTEN, result_text
    out = io.StringIO()
    log = AuditLog(out, rate=1e6, burst=100, clock=lambda: 1000.0)
    for res, value in [(RES_VALUE, 5), (RES_WRITTEN, 0), (RES_DROPPED, 0), (RES_GP, 0)]:
        log.record(vcpu=0, rip=0x10010, index=0x1A0, write=res != RES_VALUE, value=value,
                   reason=EXIT_REASON_FILTER, action="deny", result=result_text(res, value, True),
                   rule="p.toml:3 (rule 1)")
    recs = _records(log, out)
    assert [r["result"] for r in recs[:4]] == ["read 0x5 (would #GP)", "written (would #GP)",
                                               "dropped (would #GP)", "#GP (would #GP)"]
    v = Draft202012Validator(schema("audit"))
    assert [list(v.iter_errors(r)) for r in recs] == [[]] * len(recs)
    bad = dict(recs[0], result="read 0x5 (would)")
    assert list(v.iter_errors(bad))
