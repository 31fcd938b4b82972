"""The same guest program under kvmgate's Machine and booted by QEMU from `kvmgate image`:
the same guest-visible outcome (registers at the final hlt, RDMSR/WRMSR #GP list), except
where QEMU itself configures the vCPU differently (documented in README, "QEMU images")."""
import json
import shlex
from pathlib import Path

import pytest

from kvmgate.cli import main
from kvmgate.exits import GuestError
from kvmgate.image import (
    QemuRunError,
    build_image,
    make_image,
    qemu_command,
    run_qemu,
    vcpu_outcome,
)
from kvmgate.machine import Machine

HERE = Path(__file__).parent
PROBE = HERE.parents[1] / "kvmgate" / "examples" / "probe.S"
TWO = HERE / "guests" / "msr_two_vcpus.S"
MSR_CORE_THREAD_COUNT = 0x35
TIMEOUT = 30


def under_machine(source: str, vcpus: int = 1):
    with Machine(source, vcpus=vcpus) as m:
        return m.run(timeout=10)


def under_qemu(tmp_path, source_path: Path, vcpus: int = 1):
    image = build_image(source_path, tmp_path / "g.img", vcpus=vcpus)
    return run_qemu(image, vcpus, timeout=TIMEOUT)


def test_probe_same_outcome_but_qemus_own_msr(tmp_path):
    """probe.S: identical registers; the #GP list is Machine's without MSR 0x35, which QEMU
    answers itself (its own MSR filter denies reads of it to KVM and handles the exit)."""
    m = under_machine(PROBE.read_text())
    q = under_qemu(tmp_path, PROBE)
    assert len(q.vcpus) == 1
    regs_m, rip_m, rflags_m, faults_m = vcpu_outcome(m.vcpus[0])
    regs_q, rip_q, rflags_q, faults_q = vcpu_outcome(q.vcpus[0])
    assert (regs_q, rip_q, rflags_q) == (regs_m, rip_m, rflags_m)
    assert faults_q == [f for f in faults_m if f[1] != MSR_CORE_THREAD_COUNT]
    assert (0x10051, 0x12345678) in faults_q          # the probe's last RDMSR, by RIP
    assert q.status == 1                               # isa-debug-exit (0 << 1) | 1


def test_two_vcpus_same_outcome(tmp_path):
    """Per vCPU: registers (all 16, RIP after the hlt, RFLAGS) and #GP lists are identical."""
    m = under_machine(TWO.read_text(), vcpus=2)
    q = under_qemu(tmp_path, TWO, vcpus=2)
    assert [v.vcpu for v in q.vcpus] == [0, 1]
    for vm, vq in zip(m.vcpus, q.vcpus):
        assert vcpu_outcome(vq) == vcpu_outcome(vm), f"vCPU {vq.vcpu}"
    for i, v in enumerate(q.vcpus):                    # the program really ran, on each vCPU
        assert v.regs["rdi"] == i
        assert v.regs["r8"] == 0xffff800000001000 + i
        assert v.regs["r9"] == 0xffffffff81a00000 + i
        assert v.regs["r11"] == (0x00230010 + i) << 32
        assert v.regs["r13"] & 0x100 == (0x100 if i == 0 else 0)
        assert v.regs["r14"] == 0 and v.regs["r15"] == 0
        assert v.regs["rsp"] == (4 << 20) - i * 0x4000
        assert v.regs["r10"] == 0x0007040600070106
        # the reserved PAT type 2 write: #GP by the SDM, accepted by some hosts (kvm_pvm);
        # Machine and QEMU agree either way (compared above)
        assert [f.index for f in v.gp_faults if f.index != 0x277] == [0xc0000082, 0x12345678]


def test_qemu_answers_core_thread_count_itself(tmp_path):
    """Reading MSR 0x35 under QEMU gets QEMU's own answer (cores << 16 | threads), no #GP."""
    src = tmp_path / "ctc.S"
    src.write_text("mov ecx, 0x35\nrdmsr\nmov r8, rax\nhlt\n")
    q = under_qemu(tmp_path, src, vcpus=2)
    for v in q.vcpus:
        assert v.gp_faults == []
        assert v.regs["r8"] == 0x00020002


def test_exception_reported_like_machine(tmp_path):
    src = tmp_path / "ud.S"
    src.write_text("mov eax, 1\nud2\nhlt\n")
    with pytest.raises(GuestError) as em:
        under_machine(src.read_text())
    with pytest.raises(GuestError, match="#UD") as eq:
        under_qemu(tmp_path, src)
    assert (eq.value.vcpu, eq.value.rip) == (em.value.vcpu, em.value.rip) == (0, 0x10005)


def test_wrong_vcpu_count_is_named(tmp_path):
    image = build_image(TWO, tmp_path / "g.img", vcpus=2)
    with pytest.raises(QemuRunError, match="QEMU started 1 vCPUs, the image was built for 2"):
        run_qemu(image, 1, timeout=TIMEOUT)


def test_program_that_never_halts_times_out(tmp_path):
    image = tmp_path / "loop.img"
    image.write_bytes(make_image("spin: jmp spin\nhlt\n"))
    with pytest.raises(TimeoutError, match="no report"):
        run_qemu(image, timeout=1.0)


def test_cli_run_json_and_command(tmp_path, capsys):
    out = tmp_path / "two.img"
    assert main(["image", str(TWO), "--out", str(out), "--vcpus", "2", "--command"]) == 0
    assert capsys.readouterr().out.strip() == shlex.join(qemu_command(out, 2))
    assert main(["image", str(TWO), "--out", str(out), "--vcpus", "2", "--run", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["status"] == 1
    assert [v["regs"]["rdi"] for v in d["vcpus"]] == ["0x0", "0x1"]
    assert [[f["msr"] for f in v["gp_faults"]][-1] for v in d["vcpus"]] == ["0x12345678"] * 2
