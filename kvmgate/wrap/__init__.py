"""`kvmgate wrap`: the same policies, audit and counters on unmodified VMMs (QEMU), through an
LD_PRELOAD shim (csrc/shim.c) inside the VMM process.  See kvmgate.wrap.session."""
from .session import Wrap, WrapResult, allow_all_policy, as_json, prepare, report

__all__ = ["Wrap", "WrapResult", "allow_all_policy", "as_json", "prepare", "report"]
