"""`kvmgate image GUEST.S --out g.img`: a bootable QEMU image of a guest program."""
from __future__ import annotations

import argparse
import shlex

from ..image import build_image, qemu_command, run_qemu
from ..image.layout import MAX_VCPUS
from ..image.qemu import qemu_binary
from ..report import emit, table
from ..argtypes import positive_int
from .common import in_path, nonneg_seconds, out_path


def cmd_image(a) -> int:
    src = in_path(a.guest, "guest")
    out = out_path(a.out, "image")
    if a.run:
        qemu_binary()                          # no QEMU: say so before building anything
    path = build_image(src, out, vcpus=a.vcpus)
    cmd = qemu_command(path, a.vcpus)
    if a.command:
        print(shlex.join(cmd))
        return 0
    if not a.run:
        print(f"wrote {path}: {a.vcpus} vCPU{'s' if a.vcpus > 1 else ''}, "
              f"{path.stat().st_size} bytes (multiboot; the program at 0x10000)")
        print(f"run it: {shlex.join(cmd)}")
        return 0
    r = run_qemu(path, a.vcpus, timeout=a.timeout)
    rows = [{"vcpu": v.vcpu, **{k: f"{v.regs[k]:#x}" for k in ("rax", "rbx", "rcx", "rdx")},
             "rip": f"{v.rip:#x}", "gp": len(v.gp_faults)} for v in r.vcpus]
    faults = [{"vcpu": f.vcpu, "rip": f"{f.rip:#x}", "msr": f"{f.index:#x}"} for f in r.gp_faults]
    if a.json:
        emit({"image": str(path), "status": r.status,
              "vcpus": [{"vcpu": v.vcpu, "regs": {k: f"{x:#x}" for k, x in v.regs.items()},
                         "rip": f"{v.rip:#x}", "rflags": f"{v.rflags:#x}", "dropped": v.dropped,
                         "gp_faults": [{"rip": f"{f.rip:#x}", "msr": f"{f.index:#x}"}
                                       for f in v.gp_faults]} for v in r.vcpus]}, True)
        return 0
    print(f"{path}: every vCPU reached hlt under QEMU")
    table(rows)
    if faults:
        print()
        table(faults)
    return 0


def _vcpus(text: str) -> int:
    n = positive_int(text)
    if n > MAX_VCPUS:
        raise argparse.ArgumentTypeError(f"{text!r}: an image runs at most {MAX_VCPUS} vCPUs")
    return n


def register(sub) -> None:
    p = sub.add_parser("image", help="build a bootable QEMU image (multiboot) of a guest program")
    p.add_argument("guest", help="guest program, assembly (.S)")
    p.add_argument("--out", required=True, help="image file to write")
    p.add_argument("--vcpus", type=_vcpus, default=1, help="vCPUs the image runs (QEMU -smp)")
    p.add_argument("--command", action="store_true",
                   help="print only the QEMU command line that boots it (for $(...))")
    p.add_argument("--run", action="store_true",
                   help="boot it under QEMU and print what every vCPU did")
    p.add_argument("--timeout", type=nonneg_seconds, default=30.0, help="with --run (seconds)")
    p.add_argument("--json", action="store_true", help="with --run")
    p.set_defaults(fn=cmd_image)
