"""`kvmgate policy export --format kvm-filter-json` on the running kernel: a VMM that installs
the exported document with its own code (here: raw KVM_X86_SET_MSR_FILTER and KVM_ENABLE_CAP
ioctls built from the JSON alone, and exits answered from the JSON's action table) gives the
guest exactly what `kvmgate run --policy` gives it: the same #GPs and the same values read.

The guest installs its own #GP handler, which sets bit N of RBX for access N and skips the
instruction; RSI hashes every value read.  At the end RAX = that hash, RBX = the #GP bitmap,
which `kvmgate run --json` prints."""
import ctypes as C
import fcntl
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvmgate import Machine
from kvmgate.errors import InjectGP

pytestmark = pytest.mark.kvm
ROOT = Path(__file__).resolve().parents[2]

POLICY = """\
[policy]
name = "export-kvm"
default = "deny"
log = true

[[rule]]
msrs = ["IA32_SYSENTER_CS", "IA32_EFER", "IA32_KERNEL_GS_BASE", "IA32_APIC_BASE"]
action = "allow"

[[rule]]
msr = "IA32_SYSENTER_EIP"
access = "read"
action = "allow"

[[rule]]
msr = 0x35
action = "constant"
value = 0x10001
writes = "gp"

[[rule]]
msr = "IA32_LSTAR"
action = "emulate"
initial = 5
allowed = [0x1000, 0xffffffff81a00000]

[[rule]]
range = [0x186, 0x189]
action = "ignore"
log = false

[[rule]]
msr = "IA32_STAR"
action = "allow"
log = true

[[rule]]
msr = 0x12345678
action = "allow"

[unknown]
action = "ignore"

[invalid]
action = "gp"
log = true
"""

# (MSR, write, value written); "efer|2" writes EFER with a reserved bit (KVM: INVAL)
ACCESSES = [
    (0x174, False, 0), (0x174, True, 0x10), (0x174, False, 0), (0x176, False, 0),
    (0x176, True, 0x1234),                       # 4: write denied by default -> #GP
    (0x35, False, 0), (0x35, True, 1),            # 6: constant, writes = "gp"
    (0xC0000082, False, 0), (0xC0000082, True, 0x1000),
    (0xC0000082, True, 0x2000),                  # 9: not an allowed value -> #GP
    (0xC0000082, False, 0), (0x187, True, 7), (0x187, False, 0),
    (0x12345678, False, 0),                      # KVM does not implement it: [unknown] ignore
    (0xC0000081, False, 0), (0xC0000081, True, 0x0023001000000000), (0xC0000081, False, 0),
    (0x1A0, False, 0),                           # 17: listed nowhere -> #GP
    (0xC0000080, False, 0), (0xC0000080, True, "efer|2"),   # 19: INVAL -> [invalid] gp
    (0x12345678, True, 9), (0x1B, False, 0),
]
EXPECTED_GP = {4, 6, 9, 17, 19}


def guest_source() -> str:
    lines = ["lea rax, [rip + gp_handler]",
             "mov word ptr [0x20d0], ax",          # IDT (0x2000) entry 13: offset bits 0-15
             "shr rax, 16",
             "mov word ptr [0x20d6], ax",          # offset bits 16-31
             "xor ebx, ebx", "xor esi, esi", "xor r15, r15"]
    for index, write, value in ACCESSES:
        lines.append(f"mov ecx, {index:#x}")
        if not write:
            lines += ["xor eax, eax", "xor edx, edx", "rdmsr", "shl rdx, 32", "or rax, rdx",
                      "imul rsi, rsi, 31", "add rsi, rax"]
        elif value == "efer|2":
            lines += ["rdmsr", "or eax, 2", "wrmsr"]
        else:
            lines += [f"mov eax, {value & 0xFFFFFFFF:#x}", f"mov edx, {value >> 32:#x}", "wrmsr"]
        lines.append("inc r15")
    lines += ["mov rax, rsi", "hlt",
              "gp_handler:", "bts rbx, r15", "add qword ptr [rsp+8], 2", "add rsp, 8", "iretq"]
    return "\n".join(lines) + "\n"


# ---- a VMM's own installation of the document (docs/kvm-msr.md §1, §7), no kvmgate compiler

class Range(C.Structure):
    _fields_ = [("flags", C.c_uint32), ("nmsrs", C.c_uint32), ("base", C.c_uint32),
                ("pad", C.c_uint32), ("bitmap", C.c_void_p)]


class Filter(C.Structure):
    _fields_ = [("flags", C.c_uint32), ("pad", C.c_uint32), ("ranges", Range * 16)]


class EnableCap(C.Structure):
    _fields_ = [("cap", C.c_uint32), ("flags", C.c_uint32), ("args", C.c_uint64 * 4),
                ("pad", C.c_uint8 * 64)]


KVM_X86_SET_MSR_FILTER = 0x4188AEC6
KVM_ENABLE_CAP = 0x4068AEA3
KVM_CAP_X86_USER_SPACE_MSR = 188


def install(vm_fd: int, doc: dict) -> list:
    assert C.sizeof(Filter) == 0x188 and C.sizeof(EnableCap) == 0x68
    f = Filter(flags=doc["filter"]["flags"])
    keep = []
    for i, r in enumerate(doc["filter"]["ranges"]):
        raw = bytes.fromhex(r["bitmap"])
        buf = C.create_string_buffer(raw, (r["nmsrs"] + 63) // 64 * 8)   # the kernel copies u64s
        keep.append(buf)
        f.ranges[i] = Range(r["flags"], r["nmsrs"], r["base"], 0, C.addressof(buf))
    cap = EnableCap(cap=KVM_CAP_X86_USER_SPACE_MSR)
    cap.args[0] = doc["exit_mask"]
    fcntl.ioctl(vm_fd, KVM_ENABLE_CAP, bytes(cap))
    fcntl.ioctl(vm_fd, KVM_X86_SET_MSR_FILTER, bytes(f))
    return keep


def answerer(doc: dict):
    acts = doc["actions"]
    regs: dict[int, int] = {}

    def lookup(exit):
        if exit.reason == 4:
            access = "write" if exit.is_write else "read"
            return next((r for r in acts["filter"]["rules"] if r["access"] == access
                         and r["first"] <= exit.index <= r["last"]), acts["filter"]["default"])
        return {2: acts["unknown"], 1: acts["invalid"]}.get(exit.reason)

    def on_msr(exit):
        a = lookup(exit)
        if a is None or a["action"] == "deny":
            return InjectGP
        kind, w = a["action"], exit.is_write
        if kind == "ignore":
            return None if w else 0
        if kind == "constant":
            return (InjectGP if a["writes"] == "gp" else None) if w else int(a["value"], 16)
        if kind == "emulate":
            cur = regs.get(exit.index, int(a["initial"], 16))
            if not w:
                return cur
            allowed = a["allowed"]
            if (exit.data ^ cur) & ~int(a["write_mask"], 16) & (2**64 - 1) or \
                    (allowed is not None and exit.data not in [int(v, 16) for v in allowed]):
                return InjectGP
            regs[exit.index] = exit.data
            return None
        assert kind == "forward"
        done = exit.host_access()
        return InjectGP if done is None else (None if w else done)
    return on_msr


def test_exported_filter_installed_raw_gives_the_guest_what_kvmgate_run_gives(tmp_path):
    pol, guest = tmp_path / "p.toml", tmp_path / "g.S"
    pol.write_text(POLICY)
    guest.write_text(guest_source())
    out = tmp_path / "filter.json"
    r = subprocess.run([sys.executable, "-m", "kvmgate", "policy", "export", "--format",
                        "kvm-filter-json", str(pol), "-o", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["exit_mask"] == 4 | 1 | 2 and doc["filter"]["flags"] == 1

    run = subprocess.run([sys.executable, "-m", "kvmgate", "run", "--policy", str(pol),
                          str(guest), "--json", "--timeout", "60"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    regs = json.loads(run.stdout)["regs"]["0"]
    by_kvmgate = (int(regs["rax"], 16), int(regs["rbx"], 16))

    with Machine(guest.read_text()) as m:
        m.on_msr(answerer(doc))
        keep = install(m.vm.fd, doc)
        res = m.run(timeout=60)
        del keep
    by_json = (res.regs.rax, res.regs.rbx)

    gp = {n for n in range(len(ACCESSES)) if by_json[1] >> n & 1}
    assert gp == EXPECTED_GP
    assert by_json == by_kvmgate


def test_the_guest_sees_the_difference_without_the_filter():
    """The comparison above can fail: with no filter the #GP bitmap is another one."""
    with Machine(guest_source()) as m:
        res = m.run(timeout=60)
    assert {n for n in range(len(ACCESSES)) if res.regs.rbx >> n & 1} != EXPECTED_GP
