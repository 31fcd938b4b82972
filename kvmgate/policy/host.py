"""What this host's KVM does with guest accesses to given MSRs, for `policy explain`.

KVM_GET_MSR_INDEX_LIST and KVM_GET_MSR_FEATURE_INDEX_LIST name only what KVM saves/restores and
its feature MSRs (41 + 4 on a 6.x kvm_pvm host: EFER and the MTRRs are in neither), and a
host-initiated KVM_GET_MSRS/KVM_SET_MSRS is more lenient than a guest access (read-only MSRs,
CPUID-gated ones like IA32_XSS) and cannot tell UNKNOWN from INVAL (0x4b564dff, in KVM's
paravirtual range, is INVAL for a guest).  So the host is asked the way a live run meets it: a
scratch guest of the same shape as `kvmgate run`'s performs each access with no filter and every
failure exiting (probe.MsrProber.classify), and the exit reason says UNKNOWN or INVAL.  Writes
are made with the value 0, so "invalid" for a write means KVM refuses a write of 0."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import KvmError
from ..exits import GuestError
from ..kvm import Kvm
from ..machine import Machine
from ..msr.model import READ, WRITE, KernelMsr
from ..probe import MAX_ENTRIES, PROGRAM, Access, MsrProber


@dataclass(frozen=True)
class HostMsrs:
    """KernelMsr per (MSR, access); `why` says why KVM was not asked (then every access is
    guessed HANDLED, as explain did before it could ask)."""
    kinds: dict[tuple[int, int], KernelMsr] = field(default_factory=dict)
    source: str = ""
    why: str = ""

    @property
    def guessing(self) -> bool:
        return bool(self.why)

    def kernel(self, index: int, access: int) -> KernelMsr:
        return self.kinds.get((index, access), KernelMsr.HANDLED)

    def describe(self) -> str:
        if self.guessing:
            return f"guessed (every MSR taken as implemented by KVM): {self.why}"
        return f"asked {self.source}: each access made once by a scratch guest"


GUESS = HostMsrs(why="KVM not asked")


def ask_kvm(msrs: list[int], device: str = "/dev/kvm", timeout: float = 60) -> HostMsrs:
    """Classify a read and a write of each MSR on `device`; HostMsrs that guesses (and says
    why) when KVM cannot be used."""
    accesses = [Access(i, a) for i in msrs for a in (READ, WRITE)]
    kinds: dict[tuple[int, int], KernelMsr] = {}
    try:
        kvm = Kvm(device)
        try:
            with MsrProber(Machine(PROGRAM, kvm=kvm)) as p:
                for at in range(0, len(accesses), MAX_ENTRIES):
                    part = accesses[at:at + MAX_ENTRIES]
                    kinds.update(((a.index, a.access), k) for a, k in zip(part, p.classify(part)))
        finally:
            kvm.close()
    except (KvmError, OSError, GuestError, TimeoutError) as e:
        return HostMsrs(why=f"{device}: {getattr(e, 'strerror', None) or e}")
    return HostMsrs(kinds, device)
