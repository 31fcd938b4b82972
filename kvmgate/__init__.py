"""kvmgate: put a VM's MSR accesses under its owner's control, on real Linux KVM."""
from .errors import FilterError, InjectGP, KvmError, PolicyError, UserError
from .exits import GpFault, GuestError, MsrExit, RunResult, Stopped
from .vm import Machine
from .msr.model import (DEFAULT_ALLOW, DEFAULT_DENY, EXIT_REASON_FILTER, EXIT_REASON_INVAL,
                        EXIT_REASON_UNKNOWN, READ, WRITE, MsrFilter, MsrRange)

__all__ = ["Machine", "MsrFilter", "MsrRange", "InjectGP", "KvmError", "FilterError",
           "PolicyError", "UserError", "GuestError", "Stopped", "GpFault", "MsrExit", "RunResult",
           "READ", "WRITE", "DEFAULT_ALLOW", "DEFAULT_DENY",
           "EXIT_REASON_INVAL", "EXIT_REASON_UNKNOWN", "EXIT_REASON_FILTER"]
__version__ = "0.1.0"

from . import introspection  # noqa: E402,F401  (provides Machine.introspection)
