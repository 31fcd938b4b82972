"""Where the image runtime puts things, and how it ends QEMU.

The guest program's environment is kvmgate.guest's (tables at GDT..TSS, program at CODE, stacks
at the top of memory); this module adds only what booting under QEMU needs.
"""
from __future__ import annotations

import inspect

from .. import guest
from ..machine import Machine

LOAD = 0xA000              # multiboot load address of the image file: runtime, then the program
MAX_PROGRAM = 0x80000      # program bytes: the program and QEMU's multiboot command line after
                           # it stay below 640 KiB (the EBDA, then no RAM up to 1 MiB)
MAX_VCPUS = 8              # per-vCPU result slots (1 KiB each) that fit between LOAD and guest.CODE
DEFAULT_MEM_SIZE = inspect.signature(Machine).parameters["mem_size"].default   # Machine's: 4 MiB

# isa-debug-exit: QEMU exits with status (value << 1) | 1
EXIT_DONE = 0              # every vCPU finished: status 1
EXIT_EXCEPTION = 1         # a vCPU took an exception other than an MSR #GP: status 3
EXIT_SETUP = 2             # wrong vCPU count, vCPUs that did not start: status 5


def exit_status(value: int) -> int:
    """QEMU's exit status for an isa-debug-exit write of `value`."""
    return (value << 1) | 1


def defsyms(vcpus: int, mem_size: int, program_size: int) -> dict[str, int]:
    """The symbols runtime.S is assembled with (one source for every address)."""
    return {
        "LOAD": LOAD,
        "GDT": guest.GDT, "IDT": guest.IDT, "PML4": guest.PML4, "PDPT": guest.PDPT,
        "PD": guest.PD, "TSS": guest.TSS, "CODE": guest.CODE, "STACK_SIZE": guest.STACK_SIZE,
        "MEM_SIZE": mem_size, "VCPUS": vcpus, "PROG_END": guest.CODE + program_size,
        "EXIT_DONE": EXIT_DONE, "EXIT_EXCEPTION": EXIT_EXCEPTION, "EXIT_SETUP": EXIT_SETUP,
    }
