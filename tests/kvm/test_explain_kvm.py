"""`policy explain` asks this host's KVM which MSRs it implements, and agrees with a live run:
an MSR the policy allows but KVM does not implement goes to [unknown] in both."""
import json
import subprocess
import sys

from kvmgate.policy.host import ask_kvm
from kvmgate.msr.model import READ, WRITE, KernelMsr
from kvmgate.probe import Access, MsrProber

from .test_policy_kvm import SPREAD

EXTRA = [0x17, 0x2A, 0x49, 0x10B, 0x200, 0x2FF, 0xC0010114, 0x4B564DFF, 0x40000000]

POLICY = """
[policy]
default = "allow"

[[rule]]
msrs = ["MSR_CORE_THREAD_COUNT", "IA32_EFER"]
action = "allow"

[unknown]
action = "ignore"
log = true
"""

GUEST = """
    mov ecx, 0x35
    rdmsr
    mov ecx, 0xc0000080
    rdmsr
    hlt
"""


def kvmgate(*args):
    return subprocess.run([sys.executable, "-m", "kvmgate", *args], capture_output=True, text=True,
                          timeout=120)


def test_host_answers_agree_with_guest_accesses_on_another_vm():
    msrs = SPREAD + EXTRA
    host = ask_kvm(msrs)
    assert not host.guessing
    accesses = [Access(i, a) for i in msrs for a in (READ, WRITE)]
    with MsrProber() as p:
        kinds = p.classify(accesses)
    assert [host.kernel(a.index, a.access) for a in accesses] == kinds
    assert set(kinds) == set(KernelMsr)             # all three kinds were compared


def test_explain_says_unknown_where_a_live_run_goes_to_unknown(tmp_path):
    pol, guest, audit = tmp_path / "p.toml", tmp_path / "g.S", tmp_path / "audit.jsonl"
    pol.write_text(POLICY)
    guest.write_text(GUEST)
    r = kvmgate("policy", "explain", str(pol), "0x35", "EFER", "--json")
    assert r.returncode == 0, r.stderr
    rows = {(row["msr"], row["access"]): row for row in json.loads(r.stdout)}
    assert rows[("0x35", "read")]["kvm"] == "unknown" and rows[("0xc0000080", "read")]["kvm"] == "handled"
    assert rows[("0x35", "read")]["outcome"] == "exit(UNKNOWN)"
    assert rows[("0x35", "read")]["rule"] == "[unknown]"
    assert rows[("0xc0000080", "read")]["handled_by"] == "kernel"
    r = kvmgate("run", str(guest), "--policy", str(pol), "--audit", str(audit), "--timeout", "30")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(x["msr"], x["reason"], x["rule"]) for x in recs] == [("0x35", "UNKNOWN", "[unknown]")]


def test_explain_without_kvm_says_it_is_guessing(tmp_path):
    pol = tmp_path / "p.toml"
    pol.write_text(POLICY)
    r = kvmgate("policy", "explain", str(pol), "0x35", "--device", str(tmp_path / "no-kvm"))
    assert r.returncode == 0, r.stderr
    assert "handled (guess)" in r.stdout and "guessed" in r.stdout
