"""Run an image under QEMU and read what its runtime reported on COM1.

The one QEMU command line is `qemu_command()`: `kvmgate wrap -- <that>` runs the very same VM.
Machine type microvm: its firmware (qboot) boots a multiboot kernel in a fraction of a second;
the same image also boots on `-machine pc` (SeaBIOS, several seconds here).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .. import guest
from ..errors import UserError
from ..exits import GpFault, GuestError, exception_name
from . import layout

QEMU = "qemu-system-x86_64"
# -cpu host: CPUID as close as QEMU gets to Machine's KVM_GET_SUPPORTED_CPUID.  Without
# arch-capabilities because QEMU cannot set IA32_ARCH_CAPABILITIES on every host (kvm_pvm:
# "failed to set MSR 0x10a", then an assertion).
CPU = "host,-arch-capabilities"
REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

_LINE = re.compile(r"^kvmgate-image (?P<kind>vcpu(?==)|exception|error|end)\b(?P<rest>.*)$")
_KV = re.compile(r"(\w+)=(\S*)")


class QemuMissing(UserError):
    """qemu-system-x86_64 is not installed (or not on PATH)."""


class QemuRunError(GuestError):
    """QEMU ended without the runtime's report (crash, reset, wrong vCPU count, ...)."""


def qemu_binary() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise QemuMissing(f"{QEMU} not found on PATH: install QEMU (apt-get install "
                          "qemu-system-x86)")
    return path


def qemu_command(image, vcpus: int = 1, *, mem_size: int = layout.DEFAULT_MEM_SIZE,
                 serial: str = "stdio", qemu: str = QEMU) -> list[str]:
    """The QEMU command line that boots `image` (built for `vcpus` and `mem_size`): results on
    COM1 (`serial`: stdio, file:PATH, ...), exit through isa-debug-exit at 0xf4."""
    return [qemu, "-machine", "microvm", "-accel", "kvm", "-cpu", CPU,
            "-smp", str(vcpus), "-m", f"{mem_size >> 20}M",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", serial, "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel", os.fspath(image)]


@dataclass
class ImageVcpu:
    """One vCPU's end: registers at its final hlt (rip: just after it, like Machine's) and the
    RDMSR/WRMSR that took #GP, as kvmgate.exits.GpFault with absolute RIPs."""
    vcpu: int
    regs: dict[str, int]
    rip: int
    rflags: int
    gp_faults: list[GpFault]
    dropped: int = 0          # faults past the runtime's per-vCPU room, not listed


@dataclass
class QemuResult:
    """A finished QEMU run of an image."""
    status: int               # QEMU's exit status
    serial: str               # everything the guest wrote on COM1
    stderr: str
    vcpus: list[ImageVcpu] = field(default_factory=list)

    @property
    def gp_faults(self) -> list[GpFault]:
        return [f for v in self.vcpus for f in v.gp_faults]


def vcpu_outcome(v) -> tuple:
    """What a program leaves behind on one vCPU, comparable across Machine and QEMU: (the 16
    general registers as a dict, RIP after the final hlt, RFLAGS, [(#GP RIP, MSR index), ...]).
    `v` is an ImageVcpu (run_qemu) or a kvmgate.exits.VcpuResult (Machine.run)."""
    if isinstance(v, ImageVcpu):
        regs, rip, rflags = dict(v.regs), v.rip, v.rflags
    else:
        regs = {r: getattr(v.regs, r) for r in REGS}
        rip, rflags = v.regs.rip, v.regs.rflags
    return regs, rip, rflags, [(f.rip, f.index) for f in v.gp_faults]


def parse_serial(text: str, status: int, stderr: str = "") -> QemuResult:
    """The runtime's report.  QemuRunError/GuestError when QEMU did not end with it."""
    result = QemuResult(status, text, stderr)
    end = False
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        kind, kv = m.group("kind"), dict(_KV.findall(line))
        if kind == "vcpu":
            result.vcpus.append(_vcpu(kv))
        elif kind == "end":
            end = True
        elif kind == "exception":
            vec, rip = int(kv["vector"]), int(kv["rip"], 16)
            raise GuestError(f"vCPU {kv['vcpu']}: guest took {exception_name(vec)} (error code "
                             f"{int(kv['error'], 16):#x}) at RIP {rip:#x} (under QEMU)",
                             int(kv["vcpu"]), rip)
        elif kind == "error":
            raise QemuRunError(f"image runtime: {_setup_error(m.group('rest').strip(), kv)}")
    if not end or status != layout.exit_status(layout.EXIT_DONE):
        why = "QEMU reset or shut the guest down (triple fault?)" if status == 0 else \
            f"QEMU exited with status {status}"
        tail = stderr.strip().splitlines()[-3:]
        raise QemuRunError(f"no complete report from the image: {why}" +
                           (f": {' / '.join(tail)}" if tail else ""))
    return result


def _setup_error(text: str, kv: dict) -> str:
    if "qemu" in kv and "image" in kv:
        return (f"QEMU started {kv['qemu']} vCPUs, the image was built for {kv['image']} "
                f"(give QEMU -smp {kv['image']}, or rebuild with --vcpus)")
    if "started" in kv:
        return f"only {kv['started']} of {kv['image']} vCPUs came up after INIT-SIPI-SIPI"
    return text


def _vcpu(kv: dict) -> ImageVcpu:
    index = int(kv["vcpu"])
    faults = []
    for item in filter(None, kv.get("gp", "").split(",")):
        off, msr = item.lstrip("+").split(":")
        faults.append(GpFault(guest.CODE + int(off, 16), int(msr, 16), index))
    return ImageVcpu(index, {r: int(kv[r], 16) for r in REGS}, guest.CODE + int(kv["rip"].lstrip("+"), 16),
                     int(kv["rflags"], 16), faults, int(kv.get("dropped", "0")))


def run_qemu(image, vcpus: int = 1, extra_args=(), timeout: float = 30.0, *,
             mem_size: int = layout.DEFAULT_MEM_SIZE, prefix=()) -> QemuResult:
    """Boot `image` under QEMU (qemu_command, then extra_args) until its runtime reports; the
    results per vCPU.  `prefix` goes before the command (e.g. kvmgate wrap ... --).
    TimeoutError (QEMU killed) if no report in `timeout` s; QemuMissing without QEMU."""
    qemu_binary()
    if not Path(image).is_file():
        raise UserError("no such image", os.fspath(image))
    cmd = [*prefix, *qemu_command(image, vcpus, mem_size=mem_size), *extra_args]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise TimeoutError(f"QEMU gave no report within {timeout} s (a vCPU never reached hlt?); "
                           f"serial so far: {out.decode(errors='replace')[-500:]!r}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return parse_serial(out.decode(errors="replace"), proc.returncode, err.decode(errors="replace"))
