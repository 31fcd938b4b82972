"""Bootable QEMU images of kvmgate guest programs: the same program runs under Machine
(`kvmgate run`) and under QEMU (`qemu-system-x86_64 ... -kernel IMAGE`, also wrapped by
`kvmgate wrap`).

    build_image("probe.S", "g.img", vcpus=2)            # -> Path
    r = run_qemu("g.img", vcpus=2)                       # -> QemuResult
    r.vcpus[1].regs["r8"], r.gp_faults
    qemu_command("g.img", vcpus=2)                       # the one QEMU command line

See build.py for the image and the finish convention (hlt -> a #UD byte), runtime.S for the boot.
"""
from .build import ImageError, build_image, finish_marked, make_image
from .layout import DEFAULT_MEM_SIZE, MAX_PROGRAM, MAX_VCPUS
from .qemu import (
                   ImageVcpu,
                   QemuMissing,
                   QemuResult,
                   QemuRunError,
                   parse_serial,
                   qemu_binary,
                   qemu_command,
                   run_qemu,
                   vcpu_outcome,
)

# The MSR accesses the runtime itself makes on every vCPU before the program starts (policies
# and audit logs under `kvmgate wrap` see them): EFER.LME, to enter long mode.
RUNTIME_MSR_WRITES = (0xC0000080,)

__all__ = ["DEFAULT_MEM_SIZE", "MAX_PROGRAM", "MAX_VCPUS", "RUNTIME_MSR_WRITES", "ImageError",
           "ImageVcpu", "QemuMissing", "QemuResult", "QemuRunError", "build_image",
           "finish_marked", "make_image", "parse_serial", "qemu_binary", "qemu_command",
           "run_qemu", "vcpu_outcome"]
