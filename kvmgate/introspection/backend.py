"""What the introspection server needs from a live VM (implemented by `Machine`).

Threads: every method except `set_registers` is called from the thread that holds the
session's reader token (inbox.py): the server's reader thread, or a thread waiting in
`send_event` for its own reply (a vCPU's, which may be the vCPU a command names), whether or
not the guest runs at that moment, so each must be safe against running vCPUs.
`set_registers` is called by the thread that sent the event, inside `send_event`, after the
tool replied (the kernel's "delayed registers"): the vCPU's own thread, or (MachineBackend's
PAUSE of a vCPU whose thread is not running) a worker while every vCPU is held outside KVM_RUN, so plain
KVM_SET_REGS is fine there.  `control_msr(..., False)`
is also called from whichever thread closes the connection (reader, vCPU or owner thread).
The three methods with a default (`get_cpuid`, `inject_exception`, `max_gfn`) answer
-KVM_EOPNOTSUPP unless a backend implements them; `event_port` is None unless a backend has a
C event path.
A method that raises makes the command fail with -KVM_E<errno> when the exception is an OSError
whose errno is a KVM code, else -KVM_EFAULT; it never breaks the connection.
"""
from __future__ import annotations

import abc
from typing import Sequence

from .ids import KVM_EOPNOTSUPP


class Backend(abc.ABC):
    """The live-VM side of the introspection protocol (docs/introspection.md, commands)."""

    @abc.abstractmethod
    def vcpu_count(self) -> int:
        """Number of vCPUs; vCPU indexes are 0..count-1."""

    @abc.abstractmethod
    def read_physical(self, gpa: int, size: int) -> bytes | None:
        """`size` bytes of guest memory at `gpa` (within one 4 KiB page); None if outside RAM."""

    @abc.abstractmethod
    def write_physical(self, gpa: int, data: bytes) -> bool:
        """Write guest memory (within one page); False if outside RAM."""

    @abc.abstractmethod
    def get_registers(self, vcpu: int, msrs: Sequence[int]
                      ) -> tuple[int, bytes, bytes, list[tuple[int, int]]]:
        """(mode 2/4/8, kvm_regs 144 bytes, kvm_sregs 312 bytes, [(msr, value)] for `msrs`)."""

    @abc.abstractmethod
    def set_registers(self, vcpu: int, regs: bytes) -> None:
        """Load kvm_regs (144 bytes) into the vCPU (called on the vCPU's thread, see above)."""

    @abc.abstractmethod
    def tsc_khz(self) -> int | None:
        """Guest TSC frequency in kHz; 0 or None if unknown."""

    @abc.abstractmethod
    def control_msr(self, vcpu: int, msr: int, enable: bool) -> int:
        """Start/stop sending guest writes to `msr` on `vcpu` to `msr_event`.

        Return 0, or a negative KVM code: -KVM_EPERM when the owner's MSR policy denies guest
        writes to that MSR.  Disabling must restore whatever the owner's policy does alone.
        """

    @abc.abstractmethod
    def pause_vcpu(self, vcpu: int, wait: bool) -> int | None:
        """Kick `vcpu` so its thread calls `Introspection.handle_pauses` soon.

        With `wait`, return once the vCPU has left guest mode, never later (its PAUSE event
        needs the reader token, which the caller holds).  Return None/0, or a negative KVM code.
        """

    # Optional: commands a libkvmi MSR monitor uses (GET_CPUID, INJECT_EXCEPTION, GET_MAX_GFN).

    def get_cpuid(self, vcpu: int, function: int, index: int
                  ) -> tuple[int, int, int, int] | None:
        """(eax, ebx, ecx, edx) the guest sees for CPUID `function`/`index`; None if absent."""
        raise Unsupported("GET_CPUID")

    def inject_exception(self, vcpu: int, vector: int, error_code: int, address: int) -> int:
        """Queue exception `vector` (with `error_code` where it has one; `address` is CR2 for
        #PF) for injection at the vCPU's next entry; 0 or a negative KVM code."""
        raise Unsupported("INJECT_EXCEPTION")

    def max_gfn(self) -> int:
        """The highest guest frame number backed by memory."""
        raise Unsupported("GET_MAX_GFN")

    def event_port(self, sock, abi, event_timeout: float | None):
        """A registration point for a backend's own MSR event path: an armed EventPort
        (kvmgate/introspection/fast_events.py) for the session on `sock`, or None (the
        default: every event goes through the server in Python).  Called once per session,
        by the server's constructor."""
        return None


class Unsupported(OSError):
    """A Backend without this operation: the command gets -KVM_EOPNOTSUPP."""

    def __init__(self, what: str):
        super().__init__(KVM_EOPNOTSUPP, f"{what} is not supported by this backend")
