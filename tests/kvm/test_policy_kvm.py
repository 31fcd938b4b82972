"""Policies on the running kernel: every access goes where the compiled policy says."""
import io
import json
from pathlib import Path

import pytest

from ..expected import PROBE_AUDIT, audit_decisions

from kvmgate import Machine
from kvmgate.audit import AuditLog
from kvmgate.msr.model import READ, WRITE
from kvmgate.policy import compile_policy, load_policy, parse_policy
from kvmgate.probe import Access, MsrProber

pytestmark = pytest.mark.kvm
EXAMPLE = Path(__file__).resolve().parents[2] / "kvmgate" / "examples" / "deny-by-default.toml"
SPREAD = [0x10, 0x1B, 0x35, 0x3A, 0x48, 0x8B, 0x174, 0x175, 0x176, 0x186, 0x187, 0x189, 0x18A,
          0x1A0, 0x277, 0x6E0, 0xDA0, 0x4B564D00, 0x4B564D01, 0x12345678, 0xC0000080, 0xC0000081,
          0xC0000082, 0xC0000083, 0xC0000084, 0xC0000100, 0xC0000101, 0xC0000102, 0xC0000103,
          0xC0010015]


def test_example_policy_outcomes_match_kernel():
    cp = compile_policy(load_policy(EXAMPLE))
    accesses = [Access(i, a) for i in SPREAD for a in (READ, WRITE)]
    with MsrProber() as p:
        kinds = p.classify(accesses)
        observed = p.run(accesses, cp.filter, cp.exit_mask)
    for a, kind, obs in zip(accesses, kinds, observed):
        row = cp.explain(a.index, a.access, kind)
        want = row["outcome"]
        got = str(obs) if obs.fate != "exit" else f"exit({ {1: 'INVAL', 2: 'UNKNOWN', 4: 'FILTER'}[obs.reason]})"
        if obs.fate == "gp":
            assert want.startswith("#GP") or want == "gp", (a, row, obs)
        else:
            assert got == want, (a, row, obs)


def test_audit_records_exactly_the_expected_decisions():
    src = (Path(EXAMPLE).parent / "probe.S").read_text()
    buf = io.StringIO()
    audit = AuditLog(buf)
    with Machine(src) as m:
        m.set_policy(load_policy(EXAMPLE), audit)
        r = m.run(timeout=10)
    assert audit_decisions(buf.getvalue()) == PROBE_AUDIT
    recs = [json.loads(l) for l in buf.getvalue().splitlines()]
    assert all(x["rip"] and x["reason"] == "FILTER" for x in recs)
    summary = {(s["msr"], s["action"], s["result"]): s["count"] for s in audit.summary()}
    assert summary[("0x186", "ignore", "dropped")] == 1          # counted though not logged
    assert sorted(f.index for f in r.gp_faults) == sorted([0x1A0, 0xC0000082, 0x12345678])


def test_rate_limit_suppresses_and_counts():
    buf = io.StringIO()
    audit = AuditLog(buf, rate=1.0, burst=5, clock=lambda: 1000.0)
    with Machine("mov ebx, 50\nagain: mov ecx, 0x1a0\nrdmsr\ndec ebx\njnz again\nhlt") as m:
        m.set_policy(parse_policy("[policy]\ndefault='deny'\n[[rule]]\nmsr=0x10\naction='allow'"), audit)
        m.run(timeout=10)
    audit.close()
    lines = [json.loads(l) for l in buf.getvalue().splitlines()]
    assert len([x for x in lines if "action" in x]) == 5
    assert lines[-1]["suppressed"] == 45
    assert audit.summary()[0]["count"] == 50


def test_policy_swap_while_running_at_sync_point():
    allow = parse_policy("[policy]\ndefault='allow'")
    const = parse_policy("[policy]\ndefault='allow'\n[[rule]]\nmsr=0x10\naccess='read'\naction='constant'\nvalue=99")
    with Machine("mov ecx, 0x10\nrdmsr\nmov r8, rax\nout 0x80, al\nmov ecx, 0x10\nrdmsr\nmov r9, rax\nhlt") as m:
        m.set_policy(const)
        m.on_port(0x80)(lambda mach, v: mach.set_policy(allow))
        r = m.run(timeout=10)
    assert r.regs.r8 == 99 and r.regs.r9 != 99


def test_failed_swap_changes_nothing():
    good = parse_policy("[policy]\ndefault='allow'\n[[rule]]\nmsr=0x10\naccess='read'\naction='constant'\nvalue=5")
    bad = parse_policy("[[rule]]\nmsr = 0x830\naction = 'deny'")
    with Machine("mov ecx, 0x10\nrdmsr\nhlt") as m:
        m.set_policy(good)
        with pytest.raises(Exception, match="x2APIC"):
            m.set_policy(bad)
        assert m.run(timeout=10).regs.rax == 5


def test_unknown_ignore_is_per_vm_ignore_msrs():
    p = parse_policy("[policy]\ndefault='allow'\n[unknown]\naction='ignore'")
    with Machine("mov rax, -1\nmov ecx, 0x12345678\nrdmsr\nmov r8, rax\nwrmsr\nhlt") as m:
        m.set_policy(p)
        r = m.run(timeout=10)
    assert r.regs.r8 == 0 and r.gp_faults == []
