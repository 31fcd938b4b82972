"""Vcpu exits and run results as values; describing any value never raises."""
from __future__ import annotations

from . import uapi as u
from .msr.model import reason_name

def exit_name(reason) -> str:
    """KVM_EXIT_* name of an exit reason, e.g. 'KVM_EXIT_HLT'; unknown values are shown raw."""
    try:
        return u.ExitReason(reason).name
    except Exception:
        pass
    try:
        return f"KVM_EXIT_{int(reason)}(unknown)"
    except Exception:
        return f"exit({reason!r})"


class MsrExit:
    """One KVM_EXIT_X86_RDMSR/WRMSR as a handler sees it: what the guest asked for, what user
    space answered, and the vCPU it came from (its registers on demand, a host-initiated
    access), so a handler never reaches into the machine's vCPU list."""
    __slots__ = ("index", "is_write", "data", "reason", "vcpu", "reply", "_cpu")

    def __init__(self, index, is_write, data, reason, vcpu=0, reply=None, cpu=None):
        self.index = index
        self.is_write = is_write
        self.data = data          # value written (0 for reads)
        self.reason = reason      # KVM_MSR_EXIT_REASON_*
        self.vcpu = vcpu          # the vCPU's index
        self.reply = reply        # value returned to a read, "gp" or None (write completed)
        self._cpu = cpu           # the kvm.Vcpu (None for exits made by hand)

    def regs(self):
        """The vCPU's registers now (KVM_GET_REGS; `.rip` is the RDMSR/WRMSR's)."""
        return self._cpu.get_regs()

    def host_access(self, value: int | None = None) -> int | None:
        """Carry this access out host-initiated (KVM_GET_MSRS / KVM_SET_MSRS, which KVM checks
        less strictly than the guest's own): the value read or written, None if KVM refused.
        A write stores `value` (default: the guest's)."""
        return self._cpu.host_msr_access(self.index, self.is_write,
                                         self.data if value is None else value)

    def __repr__(self) -> str:
        try:
            op = f"WRMSR {self.index:#x} <- {self.data:#x}" if self.is_write else f"RDMSR {self.index:#x}"
            return f"<MsrExit vcpu{self.vcpu} {op} {reason_name(self.reason)} reply={self.reply!r}>"
        except Exception:
            return f"<MsrExit {self.index!r} {self.reason!r}>"


class GpFault:
    """A guest RDMSR/WRMSR that took #GP: recorded by the guest runtime, then skipped."""
    __slots__ = ("rip", "index", "vcpu")

    def __init__(self, rip, index, vcpu=0):
        self.rip = rip
        self.index = index
        self.vcpu = vcpu

    def __repr__(self) -> str:
        try:
            return f"<GpFault vcpu{self.vcpu} rip={self.rip:#x} msr={self.index:#x}>"
        except Exception:
            return f"<GpFault {self.rip!r} {self.index!r}>"


class Regs:
    """General-purpose registers at the end of a run, as attributes (rax..r15, rip, rflags)."""

    def __init__(self, kregs: u.kvm_regs):
        for name, _ in u.kvm_regs._fields_:
            setattr(self, name, getattr(kregs, name))

    def __repr__(self) -> str:
        return "Regs(" + ", ".join(f"{n}={getattr(self, n):#x}" for n, _ in u.kvm_regs._fields_) + ")"


class VcpuResult:
    """What one vCPU did in a run."""

    def __init__(self, vcpu: int, regs: Regs | None, gp_faults: list, msr_exits: list, exits: int,
                 msr_exit_count: int | None = None, gp_fault_count: int | None = None):
        self.vcpu = vcpu
        self.regs = regs          # None only when the registers could not be read
        self.gp_faults = gp_faults
        self.msr_exits = msr_exits    # empty when the Machine has keep_exits=False
        self.exits = exits        # every KVM_RUN return, MSR or not
        self.msr_exit_count = len(msr_exits) if msr_exit_count is None else msr_exit_count
        self.gp_fault_count = len(gp_faults) if gp_fault_count is None else gp_fault_count


class RunResult:
    """A finished run; the top-level attributes are vCPU 0's, `vcpus` has them all."""

    def __init__(self, vcpus: list[VcpuResult], seconds: float):
        self.vcpus = vcpus
        self.seconds = seconds
        self.regs = vcpus[0].regs
        self.gp_faults = vcpus[0].gp_faults if len(vcpus) == 1 else \
            [f for v in vcpus for f in v.gp_faults]
        self.msr_exits = vcpus[0].msr_exits if len(vcpus) == 1 else \
            [e for v in vcpus for e in v.msr_exits]
        self.msr_exit_count = sum(v.msr_exit_count for v in vcpus)   # also with keep_exits=False
        self.gp_fault_count = sum(v.gp_fault_count for v in vcpus)


class GuestError(RuntimeError):
    """The guest stopped in a way the run cannot continue from (exception, shutdown, failure)."""

    def __init__(self, message: str, vcpu: int = 0, rip: int | None = None):
        super().__init__(message)
        self.vcpu = vcpu
        self.rip = rip


class Stopped(RuntimeError):
    """The run was stopped from outside (Machine.stop(), close()) before every vCPU halted."""


EXCEPTION_NAMES = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM",
                   8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF",
                   17: "#AC", 18: "#MC", 19: "#XM", 20: "#VE", 21: "#CP"}


def exception_name(vector) -> str:
    return EXCEPTION_NAMES.get(vector, f"vector {vector!r}")
