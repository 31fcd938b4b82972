"""kvmgate.image without QEMU: the hlt convention, the image file, the report parser, errors."""
import struct

import pytest

from kvmgate import guest
from kvmgate import uapi as u
from kvmgate.asm import assemble
from kvmgate.cli import main
from kvmgate.errors import UserError
from kvmgate.exits import GpFault, GuestError, Regs, VcpuResult
from kvmgate.image import (
    RUNTIME_MSR_WRITES,
    ImageError,
    QemuMissing,
    QemuRunError,
    build,
    finish_marked,
    layout,
    make_image,
    parse_serial,
    qemu,
    run_qemu,
    vcpu_outcome,
)

PROGRAM = """start:  mov ecx, 0x10     ; hlt in a comment stays
        rdmsr
        cmp edi, 0
        jne other
        hlt
other:  HLT   # upper case, GNU-style comment
        mov eax, 0xf4    ; an 0xf4 byte that is no hlt
"""


def test_every_hlt_statement_and_only_those():
    text, n = finish_marked(PROGRAM)
    assert n == 2
    lines = text.splitlines()
    assert lines[0] == PROGRAM.splitlines()[0]
    assert lines[4].strip() == ".byte 0xd6"
    assert lines[5].startswith("other:  .byte 0xd6")
    assert "# upper case" in lines[5]
    assert lines[6] == PROGRAM.splitlines()[6]


def test_program_bytes_differ_from_plain_assembly_only_at_the_hlts():
    plain = assemble(PROGRAM, guest.CODE)
    code = build.assemble_program(PROGRAM)
    assert len(code) == len(plain)
    diff = [i for i in range(len(code)) if code[i] != plain[i]]
    assert len(diff) == 2
    assert all(plain[i] == 0xF4 and code[i] == 0xD6 for i in diff)
    assert plain.count(0xF4) == 3                       # mov eax, 0xf4 kept its byte


def test_image_file_is_a_multiboot_kernel_with_the_program_at_code():
    program = build.assemble_program(PROGRAM)
    img = make_image(PROGRAM, 2)
    magic, flags, checksum, header, load, load_end, bss_end, entry = struct.unpack_from("<8I", img)
    assert magic == 0x1BADB002 and (magic + flags + checksum) & 0xFFFFFFFF == 0
    assert flags & 0x10000 and header == load == layout.LOAD
    assert load_end == guest.CODE + len(program) == load + len(img)
    assert bss_end == 0 and load < entry < guest.CODE
    assert img[guest.CODE - layout.LOAD:] == program


@pytest.mark.parametrize("source, message", [
    ("mov eax, 1\n", "no hlt"),
    ("mov eax, 1\nfoo bar\nhlt\n", "line 2"),
])
def test_programs_that_cannot_be_an_image(source, message):
    with pytest.raises(ImageError, match=message):
        make_image(source, origin="g.S")


@pytest.mark.parametrize("kw", [{"vcpus": 0}, {"vcpus": layout.MAX_VCPUS + 1},
                                {"mem_size": 1 << 20}, {"mem_size": (4 << 20) + 1}])
def test_bad_vcpus_or_memory(kw):
    with pytest.raises(UserError):
        make_image("hlt\n", **kw)


def test_cli_build_error_exits_2_naming_file_and_line(tmp_path, capsys):
    src = tmp_path / "bad.S"
    src.write_text("mov eax, 1\nfoo bar\nhlt\n")
    out = tmp_path / "g.img"
    assert main(["image", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{src}: line 2" in err and "Traceback" not in err
    assert not out.exists()


def test_cli_binary_guest_refused(tmp_path, capsys):
    src = tmp_path / "g.bin"
    src.write_bytes(b"\xf4")
    assert main(["image", str(src), "--out", str(tmp_path / "g.img")]) == 2
    assert "assembly source" in capsys.readouterr().err


def test_without_qemu_a_clear_error(tmp_path, monkeypatch, capsys):
    img = tmp_path / "g.img"
    img.write_bytes(make_image("hlt\n"))
    which = qemu.shutil.which
    monkeypatch.setattr(qemu.shutil, "which",
                        lambda name, *a, **k: None if name.startswith("qemu") else which(name, *a, **k))
    with pytest.raises(QemuMissing, match="apt-get install qemu-system-x86"):
        run_qemu(img)
    src = tmp_path / "g.S"
    src.write_text("hlt\n")
    out = tmp_path / "new.img"
    assert main(["image", str(src), "--out", str(out), "--run"]) == 2
    assert "qemu-system-x86_64 not found" in capsys.readouterr().err
    assert not out.exists()                             # checked before building


def test_without_binutils_a_clear_error(monkeypatch):
    monkeypatch.setattr(build.shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(UserError, match="binutils"):
        make_image("hlt\n")


REPORT = ("boot noise\n"
          "kvmgate-image vcpu=0 rax=0x1 rbx=0x0 rcx=0x12345678 rdx=0x0 rsi=0x0 rdi=0x0 "
          "rsp=0x400000 rbp=0x0 r8=0xffffffff81a00000 r9=0x0 r10=0x0 r11=0x0 r12=0x0 r13=0x0 "
          "r14=0x0 r15=0x0 rip=+0x54 rflags=0x46 faults=2 dropped=0 gp=+0x13:0x35,+0x51:0x12345678\n"
          "kvmgate-image vcpu=1 rax=0x0 rbx=0x0 rcx=0x0 rdx=0x0 rsi=0x0 rdi=0x1 rsp=0x3fc000 "
          "rbp=0x0 r8=0x0 r9=0x0 r10=0x0 r11=0x0 r12=0x0 r13=0x0 r14=0x0 r15=0x0 rip=+0x2 "
          "rflags=0x2 faults=0 dropped=0 gp=\n"
          "kvmgate-image end\n")


def test_report_parsed():
    r = parse_serial(REPORT, 1)
    assert [v.vcpu for v in r.vcpus] == [0, 1]
    v0 = r.vcpus[0]
    assert v0.regs["rcx"] == 0x12345678 and v0.regs["r8"] == 0xffffffff81a00000
    assert v0.rip == guest.CODE + 0x54 and v0.rflags == 0x46
    assert [(f.rip, f.index, f.vcpu) for f in r.gp_faults] == [(0x10013, 0x35, 0), (0x10051, 0x12345678, 0)]
    assert r.vcpus[1].gp_faults == [] and r.vcpus[1].regs["rsp"] == 0x3fc000


@pytest.mark.parametrize("text, status, exc, match", [
    (REPORT.replace("kvmgate-image end\n", ""), 1, QemuRunError, "no complete report"),
    (REPORT, 0, QemuRunError, "triple fault"),
    ("kvmgate-image exception vcpu=1 vector=14 error=0x2 rip=0x10007\n", 3, GuestError,
     "vCPU 1: guest took #PF .error code 0x2. at RIP 0x10007"),
    ("kvmgate-image error: vcpus qemu=1 image=2\n", 5, QemuRunError, "-smp 2"),
    ("kvmgate-image error: started=1 image=2\n", 5, QemuRunError, "only 1 of 2"),
])
def test_report_failures(text, status, exc, match):
    with pytest.raises(exc, match=match):
        parse_serial(text, status)


def test_runtime_for_the_most_vcpus_fits_below_the_program():
    img = make_image("hlt\n", layout.MAX_VCPUS)
    assert len(img) == guest.CODE - layout.LOAD + 1


def test_the_runtime_touches_only_the_msrs_it_declares():
    """runtime.S's only MSR instruction is the WRMSR of IA32_EFER (RUNTIME_MSR_WRITES)."""
    ops = []
    for line in build.runtime_source().splitlines():
        words = line.split("/*")[0].replace(":", ": ").split()
        ops += [w for w in words if w in ("rdmsr", "wrmsr")]
    assert ops == ["wrmsr"]
    assert "mov     $MSR_EFER, %ecx\n        mov     $0x100, %eax" in build.runtime_source()
    assert RUNTIME_MSR_WRITES == (0xC0000080,)


def test_outcome_compares_qemu_and_machine_results():
    q = parse_serial(REPORT, 1).vcpus[0]
    k = u.kvm_regs(rax=1, rcx=0x12345678, rsp=0x400000, r8=0xffffffff81a00000,
                   rip=guest.CODE + 0x54, rflags=0x46)
    m = VcpuResult(0, Regs(k), [GpFault(0x10013, 0x35), GpFault(0x10051, 0x12345678)], [], 1)
    assert vcpu_outcome(q) == vcpu_outcome(m)
    k.r9 = 1
    assert vcpu_outcome(q) != vcpu_outcome(VcpuResult(0, Regs(k), m.gp_faults, [], 1))
