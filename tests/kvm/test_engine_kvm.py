"""The C engine answering a real guest's MSR exits on /dev/kvm (Machine.set_policy with
kvmgate.engine.EnginePolicy): guest-visible outcomes and audit records against hand-written
expectations, for the engine and for the Python handlers alike, and the engine's audit mode."""
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvmgate import Machine
from kvmgate.audit import AuditLog
from kvmgate.engine import EnginePolicy, available
from kvmgate.policy import compile_policy, parse_policy

from ..engine_policies import require_engine

pytestmark = pytest.mark.kvm

POLICY = """
[policy]
name = "engine-kvm"
default = "allow"
log = true
[[rule]]
msr = 0x35
access = "read"
action = "constant"
value = 0x10001
[[rule]]
msr = 0x186
action = "ignore"
log = false
[[rule]]
msr = 0x40000123
action = "emulate"
allowed = [0x1111, 0x2222]
[[rule]]
msr = 0x174
action = "allow"
log = true
[[rule]]
msr = 0x1a0
access = "read"
action = "deny"
[unknown]
action = "ignore"
log = true
[invalid]
action = "ignore"
log = true
"""

GUEST = """
    mov ecx, 0x35
    rdmsr
    mov r8, rax                 ; constant
    mov ecx, 0x186
    mov eax, 5
    xor edx, edx
    wrmsr                       ; ignore: dropped, counted only
    rdmsr
    mov r9, rax                 ; ignore: 0
    mov ecx, 0x40000123
    mov eax, 0x1111
    wrmsr                       ; emulate: allowed
    mov eax, 0x3333
    wrmsr                       ; emulate: refused, #GP
    rdmsr
    mov r10, rax                ; emulate: 0x1111
    mov ecx, 0x174
    mov eax, 0x10
    wrmsr                       ; allow + log: host-initiated KVM_SET_MSRS
    xor eax, eax
    rdmsr
    mov r11, rax                ; 0x10
    mov ecx, 0x1a0
    rdmsr                       ; deny: #GP
    mov rax, -1
    mov ecx, 0x12345678
    rdmsr
    mov r12, rax                ; [unknown] ignore: 0
    mov ecx, 0xc0000102
    mov edx, 0x80000000
    xor eax, eax
    wrmsr                       ; non-canonical KERNEL_GS_BASE: KVM refuses (INVAL), [invalid] ignore
    hlt
"""

RECORDS = [  # (msr, access, reason, action, result)
    ("0x35", "read", "FILTER", "constant", "read 0x10001"),
    ("0x40000123", "write", "FILTER", "emulate", "written"),
    ("0x40000123", "write", "FILTER", "emulate", "#GP"),
    ("0x40000123", "read", "FILTER", "emulate", "read 0x1111"),
    ("0x174", "write", "FILTER", "forward", "written"),
    ("0x174", "read", "FILTER", "forward", "read 0x10"),
    ("0x1a0", "read", "FILTER", "deny", "#GP"),
    ("0x12345678", "read", "UNKNOWN", "ignore", "read 0x0"),
    ("0xc0000102", "write", "INVAL", "ignore", "dropped"),
]


def run(policy):
    buf = io.StringIO()
    audit = AuditLog(buf)
    with Machine(GUEST) as m:
        m.set_policy(policy, audit)
        r = m.run(timeout=20)
    recs = [json.loads(line) for line in buf.getvalue().splitlines()]
    return r, recs, {(s["msr"], s["action"], s["result"]): s["count"] for s in audit.summary()}


def check_enforced(r, recs, counts):
    assert (r.regs.r8, r.regs.r9, r.regs.r10, r.regs.r11, r.regs.r12) == (0x10001, 0, 0x1111, 0x10, 0)
    assert [f.index for f in r.gp_faults] == [0x40000123, 0x1A0]
    assert [(x["msr"], x["access"], x["reason"], x["action"], x["result"]) for x in recs] == RECORDS
    assert all(x["rip"] and x["vcpu"] == 0 for x in recs)
    assert counts[("0x186", "ignore", "dropped")] == 1 and counts[("0x186", "ignore", "read 0x0")] == 1


@pytest.fixture(scope="module")
def cp():
    return compile_policy(parse_policy(POLICY, "engine-kvm.toml"))


def test_python_handlers_meet_the_expectations(cp):
    check_enforced(*run(cp))


def test_engine_meets_the_same_expectations(cp):
    require_engine()
    r, recs, counts = run(EnginePolicy(cp))
    check_enforced(r, recs, counts)
    py_r, py_recs, py_counts = run(cp)
    strip = [{k: v for k, v in x.items() if k != "time"} for x in recs]
    assert strip == [{k: v for k, v in x.items() if k != "time"} for x in py_recs]
    assert counts == py_counts


def test_engine_audit_mode_logs_would_be_denials_and_lets_them_happen(cp):
    require_engine()
    r, recs, _ = run(EnginePolicy(cp, mode="audit"))
    # the denied read of 0x1a0 happened (host-initiated): no #GP, a record saying so;
    # the refused emulate write went to the real MSR 0x40000123, which KVM does not know: #GP
    assert [f.index for f in r.gp_faults] == [0x40000123]
    by = {(x["msr"], x["access"], x["result"].split(" ")[0]): x for x in recs}
    misc = by[("0x1a0", "read", "read")]
    assert misc["action"] == "deny" and misc["result"].endswith(" (would #GP)")
    assert by[("0x40000123", "write", "#GP")]["result"] == "#GP (would #GP)"
    assert r.regs.r8 == 0x10001 and r.regs.r10 == 0x1111      # what the policy answers is unchanged


def test_info_says_whether_the_engine_is_built():
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "kvmgate", "info", "--json"], cwd=root,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    eng = json.loads(out.stdout)["engine"]
    assert eng["available"] is available()
    assert (eng["reason"] == "") is available()
