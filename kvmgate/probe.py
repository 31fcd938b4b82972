"""MsrProber: a guest that performs a table of MSR accesses and reports where each one went.

Used by the differential tests (model vs kernel), the demo and `explain --live`.  Each access
is announced on a marker port first, so exits and #GPs are attributed to exactly one entry.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from . import guest
from .vm import Machine
from .msr.model import (EXIT_REASON_INVAL, EXIT_REASON_UNKNOWN, EXIT_REASON_VALID_MASK,
                        KernelMsr, READ, WRITE)

MARK_PORT = 0xE0E0
TABLE = guest.DATA + 16
ENTRY = 16
MAX_ENTRIES = (0x100000 - 16) // ENTRY

PROGRAM = f"""
    xor r12, r12
    mov r13, [{guest.DATA}]
    mov r14, {TABLE}
next:
    cmp r12, r13
    jae done
    mov eax, r12d
    mov dx, {MARK_PORT}
    out dx, eax
    mov ecx, [r14]
    mov eax, [r14+8]
    mov edx, [r14+12]
    cmp dword ptr [r14+4], 0
    jne do_write
    rdmsr
    jmp after
do_write:
    wrmsr
after:
    add r14, 16
    inc r12
    jmp next
done:
    mov eax, r12d
    mov dx, {MARK_PORT}
    out dx, eax
    hlt
"""


@dataclass(frozen=True)
class Access:
    index: int
    access: int = READ      # READ or WRITE
    value: int = 0          # written value (EDX:EAX) for writes


@dataclass(frozen=True)
class Observed:
    """What happened to one access: 'kernel', 'exit' (with reason) or 'gp'."""
    fate: str
    reason: int = 0

    def __str__(self) -> str:
        return f"exit({self.reason})" if self.fate == "exit" else self.fate


KEEP = object()   # run(): leave the installed filter as it is


class MsrProber:
    """One VM reused across many probes: set a filter and exit mask, run a table of accesses."""

    def __init__(self, machine: Machine | None = None):
        self.machine = machine or Machine(PROGRAM)
        self._cur = -1
        self._exit: dict[int, int] = {}
        self._gp: set[int] = set()
        m = self.machine
        m.on_port(MARK_PORT)(self._mark)
        m.on_msr(self._msr)
        m.on_gp(self._fault)

    def close(self) -> None:
        self.machine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _mark(self, machine, value):
        self._cur = value

    def _msr(self, exit):
        self._exit[self._cur] = exit.reason
        return 0 if not exit.is_write else None

    def _fault(self, fault):
        self._gp.add(self._cur)

    def run(self, accesses: list[Access], flt=None, exit_mask: int = 0,
            timeout: float = 30) -> list[Observed]:
        """Install `flt` (None: no filtering; KEEP: leave it) and `exit_mask`, run the accesses."""
        if len(accesses) > MAX_ENTRIES:
            raise ValueError(f"at most {MAX_ENTRIES} accesses per run")
        m = self.machine
        if flt is not KEEP:
            m.set_msr_filter(flt)
        m.enable_user_space_msr(exit_mask)
        table = bytearray(struct.pack("<Q8x", len(accesses)))
        for a in accesses:
            table += struct.pack("<IIQ", a.index, 1 if a.access == WRITE else 0, a.value)
        m.write_mem(guest.DATA, bytes(table))
        self._exit.clear()
        self._gp.clear()
        m.run(timeout=timeout)
        out = []
        for i in range(len(accesses)):
            if i in self._exit:
                out.append(Observed("exit", self._exit[i]))
            elif i in self._gp:
                out.append(Observed("gp"))
            else:
                out.append(Observed("kernel"))
        return out

    def classify(self, accesses: list[Access]) -> list[KernelMsr]:
        """What KVM's own emulation does with each access: no filter, every failure exits."""
        kinds = []
        for o in self.run(accesses, None, EXIT_REASON_VALID_MASK):
            if o.fate == "kernel":
                kinds.append(KernelMsr.HANDLED)
            elif o.reason == EXIT_REASON_UNKNOWN:
                kinds.append(KernelMsr.UNKNOWN)
            elif o.reason == EXIT_REASON_INVAL:
                kinds.append(KernelMsr.INVALID)
            else:
                raise AssertionError(f"unexpected baseline outcome {o}")
        return kinds
