"""Host facts: KVM API version, the MSR capabilities, the kvm.ignore_msrs module parameter."""
from __future__ import annotations

from pathlib import Path

from . import uapi as u
from .kvm import REQUIRED_CAPS, Kvm

IGNORE_MSRS = Path("/sys/module/kvm/parameters/ignore_msrs")


def ignore_msrs() -> bool | None:
    """kvm.ignore_msrs (None when unreadable): Y makes KVM swallow unknown MSRs host-wide."""
    try:
        return IGNORE_MSRS.read_text().strip().upper() in ("Y", "1")
    except OSError:
        return None


def host_info(path: str = "/dev/kvm") -> dict:
    with Kvm(path, require=()) as kvm:
        caps = {name: kvm.check_extension(cap) for name, cap in REQUIRED_CAPS.items()}
        return {"device": path, "api_version": kvm.api_version(),
                "capabilities": caps,
                "KVM_CAP_X86_USER_SPACE_MSR": caps["KVM_CAP_X86_USER_SPACE_MSR"],
                "KVM_CAP_X86_MSR_FILTER": caps["KVM_CAP_X86_MSR_FILTER"],
                "ignore_msrs": ignore_msrs(),
                "msrs_saved_by_kvm": len(kvm.msr_index_list()),
                "kvm_run_mmap_size": kvm.vcpu_mmap_size,
                "uapi_api_version": u.KVM_API_VERSION}
