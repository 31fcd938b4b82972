"""The command line: user mistakes exit 2 with a located message and no traceback."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ..expected import PROBE_AUDIT, audit_decisions

EXAMPLES = Path(__file__).resolve().parents[2] / "kvmgate" / "examples"


def kvmgate(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "kvmgate", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


@pytest.mark.parametrize("content,where", [
    ("[policy]\ndefault = 'nope'\n", "bad.toml:2"),
    ("[[rule]]\nmsr = 'NO_SUCH_MSR'\naction = 'deny'\n", "bad.toml:2"),
    ("not toml at all [", "bad.toml"),
])
def test_policy_check_bad_file_exit_2(tmp_path, content, where):
    f = tmp_path / "bad.toml"
    f.write_text(content)
    r = kvmgate("policy", "check", str(f))
    assert r.returncode == 2 and where in r.stderr and "Traceback" not in r.stderr


def test_missing_file_and_bad_arguments_exit_2(tmp_path):
    r = kvmgate("policy", "check", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "missing.toml" in r.stderr and "Traceback" not in r.stderr
    r = kvmgate("policy", "explain", str(EXAMPLES / "deny-by-default.toml"), "NOT_AN_MSR")
    assert r.returncode == 2 and "NOT_AN_MSR" in r.stderr
    r = kvmgate("frobnicate")
    assert r.returncode == 2


def test_policy_check_compile_explain_diff():
    pol = str(EXAMPLES / "deny-by-default.toml")
    r = kvmgate("policy", "check", pol)
    assert r.returncode == 0 and "OK" in r.stdout
    rep = json.loads(kvmgate("policy", "compile", pol, "--json").stdout)
    assert rep["default"] == "DEFAULT_DENY" and 1 <= len(rep["ranges"]) <= 16
    rows = json.loads(kvmgate("policy", "explain", pol, "LSTAR", "--json").stdout)
    assert {(r["access"], r["handled_by"]) for r in rows} == {("read", "kernel"), ("write", "user space: emulate")}
    r = kvmgate("policy", "diff", pol, pol)
    assert r.returncode == 0 and "no difference" in r.stdout


@pytest.mark.kvm
def test_run_with_policy_and_audit(tmp_path):
    audit = tmp_path / "audit.jsonl"
    r = kvmgate("run", "--policy", str(EXAMPLES / "deny-by-default.toml"), str(EXAMPLES / "probe.S"),
                "--audit", str(audit), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["gp_faults"] == 3
    assert audit_decisions(audit.read_text()) == PROBE_AUDIT


@pytest.mark.kvm
def test_demo_runs():
    r = kvmgate("demo")
    assert r.returncode == 0 and "MSR_CORE_THREAD_COUNT" in r.stdout and "user space (FILTER)" in r.stdout


@pytest.mark.kvm
def test_sighup_reloads_policy_while_guest_runs(tmp_path):
    import signal
    import time
    pol = tmp_path / "p.toml"
    rule = "[policy]\ndefault='allow'\n[[rule]]\nmsr=0x35\naccess='read'\naction='constant'\nvalue={}\n"
    pol.write_text(rule.format(1))
    guest = tmp_path / "g.S"
    guest.write_text("again:\nmov ecx, 0x35\nrdmsr\ncmp eax, 2\njne again\nhlt\n")
    p = subprocess.Popen([sys.executable, "-m", "kvmgate", "run", "--policy", str(pol), str(guest),
                          "--timeout", "30", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    time.sleep(1.5)
    assert p.poll() is None                      # spinning under value 1
    pol.write_text("this is not toml [")
    p.send_signal(signal.SIGHUP)                 # a bad file is refused, the old policy stays
    time.sleep(0.5)
    assert p.poll() is None
    pol.write_text(rule.format(2))
    p.send_signal(signal.SIGHUP)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "reload refused" in err and "reloaded" in err
    assert json.loads(out)["regs"]["0"]["rax"] == "0x2"


@pytest.mark.kvm
def test_ctrl_c_stops_every_vcpu_cleanly(tmp_path):
    import signal
    import time
    guest = tmp_path / "spin.S"
    guest.write_text("spin: jmp spin\n")
    p = subprocess.Popen([sys.executable, "-m", "kvmgate", "run", str(guest), "--vcpus", "3",
                          "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 130 and "Traceback" not in err


@pytest.mark.kvm
def test_run_flat_binary_guest(tmp_path):
    from kvmgate.asm import assemble
    code = assemble("mov ecx, 0x35\nrdmsr\nhlt", 0x10000)
    (tmp_path / "g.bin").write_bytes(code)
    (tmp_path / "p.toml").write_text(
        "[policy]\ndefault='allow'\n[[rule]]\nmsr=0x35\naccess='read'\naction='constant'\nvalue=0x42\n")
    r = kvmgate("run", "--policy", str(tmp_path / "p.toml"), str(tmp_path / "g.bin"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["regs"]["0"]["rax"] == "0x42"


def test_run_bad_guest_source_exit_2(tmp_path):
    (tmp_path / "g.S").write_text("mov ecx, 0x35\nfrobnicate rax\nhlt\n")
    r = kvmgate("run", str(tmp_path / "g.S"))
    assert r.returncode == 2 and "line 2" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.kvm
def test_info_reports_capabilities_and_ignore_msrs():
    out = json.loads(kvmgate("info", "--json").stdout)
    assert out["api_version"] == 12
    assert out["KVM_CAP_X86_USER_SPACE_MSR"] == 1 and out["KVM_CAP_X86_MSR_FILTER"] == 1
    assert out["ignore_msrs"] in (True, False, None)
