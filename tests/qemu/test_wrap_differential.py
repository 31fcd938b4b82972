"""One MSR program, one policy, two runners: kvmgate's own Machine (what `kvmgate run` does:
Machine.set_policy + AuditLog) and `kvmgate wrap -- qemu-system-x86_64 ...` (the shim inside an
unmodified QEMU).  Every action kind on 2 vCPUs: identical guest-visible outcomes and identical
audit records except time and RIP (the two images differ)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from kvmgate.audit import AuditLog
from kvmgate.machine import Machine
from kvmgate.policy import load_policy
from kvmgate.wrap import pvhguest
from tests.qemu import procs

ROOT = Path(__file__).resolve().parents[2]
LSTAR_OK = 0xFFFFFFFF81A00000

POLICY = f"""
[policy]
name = "differential"
default = "allow"
log = true

[[rule]]
msr = "IA32_EFER"                 # the QEMU guest's own long-mode entry
access = "both"
action = "allow"
log = false

[[rule]]
msr = 0x174                       # allowed + logged: carried out host-initiated
access = "read"
action = "allow"
log = true

[[rule]]
msr = 0x175                       # denied
access = "write"
action = "deny"

[[rule]]
msr = 0xce                        # constant
access = "read"
action = "constant"
value = 0x1234

[[rule]]
msr = 0x176                       # ignore
access = "both"
action = "ignore"

[[rule]]
msr = "IA32_LSTAR"                # emulate: one allowed value
access = "both"
action = "emulate"
allowed = [{LSTAR_OK:#x}]

[unknown]
action = "ignore"
log = true

[invalid]
action = "gp"
log = true
"""

ACCESSES = [
    (0x174, 1, 0x10), (0x174, 0, 0),                      # kernel write, logged read
    (0x175, 1, 0x1000), (0x175, 0, 0),                    # denied write, kernel read
    (0xCE, 0, 0), (0xCE, 1, 7),                           # constant read, kernel write
    (0x176, 1, 0x55), (0x176, 0, 0),                      # ignore
    (0xC0000082, 1, LSTAR_OK), (0xC0000082, 0, 0),        # emulate: allowed value, read back
    (0xC0000082, 1, 0x1234), (0xC0000082, 0, 0),          # emulate: refused value
    (0x12345678, 0, 0), (0x12345678, 1, 9),               # [unknown]
    (0x2FF, 1, 1 << 40),                                  # [invalid]: MTRRdefType reserved bits
]


def machine_program() -> str:
    """The same accesses for kvmgate's long-mode runtime; OUT 0x90+vCPU names the access
    about to happen (so a #GP can be matched to it), results at 0x100000 + vCPU * 0x1000."""
    lines = ["mov rbx, rdi", "shl rbx, 12", "add rbx, 0x100000"]
    for k, (msr, write, value) in enumerate(ACCESSES):
        lines += ["mov dx, 0x90", "add dx, di", f"mov al, {k}", "out dx, al",
                  f"mov ecx, {msr:#x}", f"mov eax, {value & 0xffffffff:#x}",
                  f"mov edx, {value >> 32:#x}"]
        if write:
            lines.append("wrmsr")
        else:
            lines += ["xor eax, eax", "xor edx, edx", "rdmsr"]
        lines += [f"mov [rbx + {16 * k}], eax", f"mov [rbx + {16 * k + 4}], edx"]
    lines.append("hlt")
    return "\n".join(lines)


def run_machine(policy_path: Path, audit_path: Path) -> dict:
    pol = load_policy(policy_path)
    audit = AuditLog(str(audit_path), rate=pol.audit_rate, burst=pol.audit_burst)
    current = {0: -1, 1: -1}
    faulted = set()
    with Machine(machine_program(), vcpus=2) as m:
        for v in (0, 1):
            m.on_port(0x90 + v)(lambda _m, value, v=v: current.__setitem__(v, value & 0xFF))
        m.on_gp(lambda f: faulted.add((f.vcpu, current[f.vcpu])))
        m.set_policy(pol, audit)
        m.run(timeout=60)
        out = {}
        for v in (0, 1):
            mem = m.read_mem(0x100000 + v * 0x1000, 16 * len(ACCESSES))
            for k, (msr, write, _value) in enumerate(ACCESSES):
                fault = int((v, k) in faulted)
                value = 0 if write else int.from_bytes(mem[16 * k:16 * k + 8], "little")
                out[(v, k)] = (value, fault)
    audit.close()
    return out


def run_wrap(policy_path: Path, audit_path: Path, tmp: Path) -> dict:
    elf = pvhguest.build(ACCESSES, tmp, vcpus=2)
    r = procs.run([sys.executable, "-m", "kvmgate", "wrap", "--policy", str(policy_path),
                   "--audit", str(audit_path), "--", *pvhguest.qemu_argv(elf, 2)], 60, cwd=ROOT)
    assert r.returncode == pvhguest.EXIT_OK, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("R ")]
    out = {}
    for v in (0, 1):
        mine = [w for w in rows if int(w[1], 16) == v]
        assert len(mine) == len(ACCESSES)
        for k, (_msr, write, _value) in enumerate(ACCESSES):
            # the QEMU guest prints EDX:EAX after every access; for writes that is the input
            out[(v, k)] = (0 if write else int(mine[k][4], 16), int(mine[k][5], 16))
    return out


def comparable(path: Path) -> list[tuple]:
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        rec.pop("time"), rec.pop("rip", None)
        out.append(tuple(sorted(rec.items())))
    return sorted(out)


def test_same_program_same_policy_same_outcomes_and_audit(tmp_path):
    pol = tmp_path / "differential.toml"
    pol.write_text(POLICY)
    a_run, a_wrap = tmp_path / "run.jsonl", tmp_path / "wrap.jsonl"
    by_run = run_machine(pol, a_run)
    by_wrap = run_wrap(pol, a_wrap, tmp_path)
    assert by_run == by_wrap
    # the outcomes are the policy's, not an accident of both runners agreeing on nothing
    for v in (0, 1):
        assert by_run[(v, 1)] == (0x10, 0)                   # logged read sees the kernel write
        assert by_run[(v, 2)][1] == 1                        # deny
        assert by_run[(v, 4)] == (0x1234, 0)                 # constant
        assert by_run[(v, 7)] == (0, 0)                      # ignore
        assert by_run[(v, 9)] == (LSTAR_OK, 0)               # emulate kept the allowed value
        assert by_run[(v, 10)][1] == 1 and by_run[(v, 11)] == (LSTAR_OK, 0)
        assert by_run[(v, 12)] == (0, 0) and by_run[(v, 13)][1] == 0   # [unknown] ignore
        assert by_run[(v, 14)][1] == 1                       # [invalid] gp
    recs_run, recs_wrap = comparable(a_run), comparable(a_wrap)
    assert recs_run == recs_wrap
    reasons = {dict(r)["reason"] for r in recs_run}
    assert reasons == {"FILTER", "UNKNOWN", "INVAL"}
    assert {dict(r)["vcpu"] for r in recs_run} == {0, 1}


# ---- the same program, byte for byte: kvmgate image of the guest program Machine runs

def hashing_program() -> str:
    """Every access of ACCESSES; what reads return is folded into r8/r9 (the image reports
    registers and the #GP list, by RIP, at the final hlt)."""
    lines = ["xor r8, r8", "xor r9, r9"]
    for msr, write, value in ACCESSES:
        lines += [f"mov ecx, {msr:#x}", f"mov eax, {value & 0xffffffff:#x}",
                  f"mov edx, {value >> 32:#x}"]
        if write:
            lines.append("wrmsr")
        else:
            lines += ["xor eax, eax", "xor edx, edx", "rdmsr", "xor r8, rax", "rol r8, 7",
                      "xor r9, rdx", "rol r9, 5"]
    lines += ["xor eax, eax", "xor ecx, ecx", "xor edx, edx", "hlt"]
    return "\n".join(lines)


def test_same_image_under_kvmgate_run_and_wrap(tmp_path):
    """One guest program (kvmgate's own format) on 2 vCPUs: Machine with the policy vs its
    `kvmgate image` booted by QEMU under `kvmgate wrap` with the same policy: identical
    registers, RIPs, #GP lists (by RIP and MSR) and audit records except time."""
    from kvmgate.image import build_image, run_qemu, vcpu_outcome
    pol = tmp_path / "differential.toml"
    pol.write_text(POLICY)
    src = tmp_path / "prog.S"
    src.write_text(hashing_program())
    a_run, a_wrap = tmp_path / "run.jsonl", tmp_path / "wrap.jsonl"
    p = load_policy(pol)
    audit = AuditLog(str(a_run), rate=p.audit_rate, burst=p.audit_burst)
    with Machine(src.read_text(), vcpus=2) as m:
        m.set_policy(p, audit)
        by_run = m.run(timeout=60)
    audit.close()
    image = build_image(src, tmp_path / "prog.img", vcpus=2)
    by_wrap = run_qemu(image, 2, timeout=60, prefix=[sys.executable, "-m", "kvmgate", "wrap",
                                                      "--policy", str(pol), "--audit", str(a_wrap), "--"])
    assert [vcpu_outcome(v) for v in by_wrap.vcpus] == [vcpu_outcome(v) for v in by_run.vcpus]
    faults = {msr for v in by_run.vcpus for _rip, msr in vcpu_outcome(v)[3]}
    assert faults == {0x175, 0xCE, 0xC0000082, 0x2FF}    # deny, KVM, emulate refusal, [invalid]

    def records(path):
        out = []
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            rec.pop("time")
            out.append(tuple(sorted(rec.items())))
        return sorted(out)
    assert records(a_run) == records(a_wrap)
    assert len(records(a_run)) == 2 * 13             # every logged decision, both vCPUs
