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


# ---- behaviour that mutation testing showed unguarded (issue 16) ----

def _run_policy(text: str, asm: str, audit=None):
    with Machine(asm) as m:
        m.set_policy(parse_policy(text), audit)
        return m.run(timeout=10)


def test_emulate_stores_a_write_that_passes_its_checks():
    # the guest writes an allowed value, then a refused one, and reads the register back each time
    text = ("[policy]\ndefault='allow'\n[[rule]]\nmsr=0x10\naction='emulate'\ninitial=7\n"
            "write_mask=0xff\n")
    asm = """
        mov ecx, 0x10
        rdmsr
        mov r8, rax          ; initial value
        mov eax, 0x42
        xor edx, edx
        wrmsr                ; only masked bits change: stored
        rdmsr
        mov r9, rax
        mov eax, 0x142       ; bit 8 is outside write_mask: #GP, nothing stored
        wrmsr
        rdmsr
        mov r10, rax
        hlt
    """
    r = _run_policy(text, asm)
    assert (r.regs.r8, r.regs.r9, r.regs.r10) == (7, 0x42, 0x42)
    assert [f.index for f in r.gp_faults] == [0x10]


def test_emulate_allowed_list_stores_only_listed_values():
    text = "[policy]\ndefault='allow'\n[[rule]]\nmsr=0x10\naction='emulate'\nallowed=[5, 9]\n"
    asm = """
        mov ecx, 0x10
        mov eax, 9
        xor edx, edx
        wrmsr
        rdmsr
        mov r8, rax
        mov eax, 6
        wrmsr
        rdmsr
        mov r9, rax
        hlt
    """
    r = _run_policy(text, asm)
    assert (r.regs.r8, r.regs.r9) == (9, 9)
    assert len(r.gp_faults) == 1


@pytest.mark.parametrize("table,asm,reason", [
    ("unknown", "mov ecx, 0x12345678\nrdmsr\nhlt", "UNKNOWN"),
    # a reserved EFER bit is refused by KVM itself: exit reason INVAL
    ("invalid", "mov ecx, 0xc0000080\nrdmsr\nor eax, 2\nwrmsr\nhlt", "INVAL"),
])
def test_failure_tables_gp_with_log_are_logged(table, asm, reason):
    buf = io.StringIO()
    audit = AuditLog(buf)
    r = _run_policy(f"[policy]\ndefault='allow'\n[{table}]\naction='gp'\nlog=true\n", asm, audit)
    audit.close()
    recs = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert len(r.gp_faults) == 1
    assert [(x["reason"], x["action"], x["result"], x["rule"]) for x in recs] == \
        [(reason, "deny", "#GP", f"[{table}]")]


@pytest.mark.parametrize("table,asm", [
    ("unknown", "mov ecx, 0x12345678\nrdmsr\nhlt"),
    ("invalid", "mov ecx, 0xc0000080\nrdmsr\nor eax, 2\nwrmsr\nhlt"),
])
def test_failure_tables_gp_without_log_stay_in_the_kernel(table, asm):
    buf = io.StringIO()
    audit = AuditLog(buf)
    with Machine(asm) as m:
        m.set_policy(parse_policy(f"[policy]\ndefault='allow'\n[{table}]\naction='gp'\n"), audit)
        assert m.exit_mask == 0
        r = m.run(timeout=10)
    assert len(r.gp_faults) == 1 and r.msr_exits == [] and buf.getvalue() == ""


def test_policy_without_default_denies_unlisted_msrs():
    # 0x10 (TSC) is readable by any guest; a policy that only lists 0x1b must deny it
    text = "[[rule]]\nmsr=0x1b\naccess='read'\naction='allow'\n"
    r = _run_policy(text, "mov ecx, 0x1b\nrdmsr\nmov ecx, 0x10\nrdmsr\nhlt")
    assert [f.index for f in r.gp_faults] == [0x10]


def test_one_msr_range_is_a_rule_for_that_msr():
    text = "[policy]\ndefault='deny'\nlog=false\n[[rule]]\nrange=[0x10, 0x10]\naccess='read'\naction='allow'\n"
    r = _run_policy(text, "mov ecx, 0x10\nrdmsr\nmov ecx, 0x11\nrdmsr\nmov ecx, 0xf\nrdmsr\nhlt")
    assert [f.index for f in r.gp_faults] == [0x11, 0xF]


class SteppingClock:
    """A fake clock that moves `step` seconds on every reading (binary fractions: exact sums)."""

    def __init__(self, step: float, start: float = 1000.0):
        self.now, self.step = start - step, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_rate_limit_refills_at_rate_tokens_per_second():
    # rate 4/s and 0.125 s between records: half a token per record, so after the burst of 2
    # (and one more from the refill) every second record is written.  Hand-computed:
    # records 0, 1, 2 written, then 4, 6, ..., 18: 3 + 8 = 11 written, 9 suppressed.
    buf = io.StringIO()
    audit = AuditLog(buf, rate=4.0, burst=2, clock=SteppingClock(0.125))
    with Machine("mov ebx, 20\nagain: mov ecx, 0x1a0\nrdmsr\ndec ebx\njnz again\nhlt") as m:
        m.set_policy(parse_policy("[policy]\ndefault='deny'\n[[rule]]\nmsr=0x10\naction='allow'"), audit)
        m.run(timeout=10)
    audit.close()
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    decisions = [x for x in lines if "action" in x]
    assert len(decisions) == 11
    assert [x.get("suppressed_before", 0) for x in decisions] == [0, 0, 0] + [1] * 8
    assert lines[-1]["suppressed"] == 1      # the 20th record, suppressed, reported at close
    assert audit.summary()[0]["count"] == 20
