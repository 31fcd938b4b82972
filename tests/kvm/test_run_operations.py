"""`kvmgate run` for operators: Prometheus counters that rise while the guest runs, permissive
(audit) mode, and the audit records against the shipped schema."""
import json
import re
import signal
import urllib.request

import pytest
from jsonschema import Draft202012Validator
from prometheus_client.parser import text_string_to_metric_families

from kvmgate.engine import available as engine_available
from kvmgate.schemas import schema

from .test_cli import READY, Child

# vCPU 0 reads an MSR the policy denies, forever (until the run is stopped)
SPIN_DENIED = "again:\nmov ecx, 0x12345\nrdmsr\njmp again\n"
DENY = "[policy]\ndefault='deny'\nlog=true\naudit_rate=5\naudit_burst=5\n"


def _decisions(url: str) -> float:
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "kvmgate_decisions_total" and s.labels["msr"] == "0x12345")


@pytest.mark.kvm
def test_metrics_endpoint_counters_rise_during_a_run(tmp_path):
    pol, guest, audit = tmp_path / "p.toml", tmp_path / "g.S", tmp_path / "a.jsonl"
    pol.write_text(DENY)
    guest.write_text(SPIN_DENIED)
    with Child("--policy", str(pol), "--audit", str(audit), "--metrics-port", "0", str(guest),
               "--timeout", "120", "--json") as c:
        url = re.search(r"(http://\S+/metrics)", c.wait_line("metrics on")).group(1)
        c.wait_line(READY)
        first = _decisions(url)
        second = first
        while second <= first:                 # the guest keeps exiting: the counter rises
            second = _decisions(url)
        c.p.send_signal(signal.SIGTERM)
        rc, out, err = c.finish()
    assert rc == 128 + signal.SIGTERM, err
    assert second > first
    summary = json.loads(out)["decisions"]
    assert [r["count"] for r in summary if r["msr"] == "0x12345"][0] >= second
    v = Draft202012Validator(schema("audit"))
    for line in audit.read_text().splitlines():
        assert not list(v.iter_errors(json.loads(line))), line


@pytest.mark.kvm
@pytest.mark.skipif(not engine_available(), reason="permissive mode runs through the C engine")
def test_permissive_mode_logs_what_would_be_denied_and_lets_it_happen(tmp_path):
    pol, guest, audit = tmp_path / "p.toml", tmp_path / "g.S", tmp_path / "a.jsonl"
    # IA32_SYSENTER_CS (0x174) is a real MSR KVM implements: denied by the policy, but in audit
    # mode the write is carried out and reads back; enforce mode gives #GP
    pol.write_text("[policy]\ndefault='deny'\nlog=true\n[[rule]]\nmsr=0x10\naction='allow'\n")
    guest.write_text("mov ecx, 0x174\nmov eax, 0x42\nxor edx, edx\nwrmsr\nxor eax, eax\nrdmsr\n"
                     "mov r8, rax\nhlt\n")
    for mode, r8, gp in (("audit", "0x42", 0), ("enforce", "0x0", 2)):
        with Child("--policy", str(pol), "--audit", str(audit), "--mode", mode, str(guest),
                   "--timeout", "60", "--json") as c:
            rc, out, err = c.finish()
        assert rc == 0, err
        res = json.loads(out)
        assert res["gp_faults"] == gp
        assert res["regs"]["0"]["rax"] == r8
    recs = [json.loads(x) for x in audit.read_text().splitlines()]
    audit_mode = [r for r in recs if "would" in r.get("result", "")]
    assert [(r["msr"], r["access"]) for r in audit_mode] == [("0x174", "write"), ("0x174", "read")]
