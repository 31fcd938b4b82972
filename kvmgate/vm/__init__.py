"""The machine layer: a VM and its vCPU threads running a guest program.

machine   `Machine`: lifecycle, memory, run()
config    Machine's configuration methods (handlers, filter, exit mask, policy, interceptions)
threads   vCPU thread coordination: kick, park, quiesce, stop (KICK_SIGNAL)
gate      the MSR gate: the owner's filter and handler or a bound policy, interceptions
          layered over them, routing of MSR exits (PolicyBinding, marshal_filter)
loop      the exit loop: a dispatch over the decoded exits of kvmgate.vcpu_exit
"""
from .gate import Interception, MsrGate, PolicyBinding, marshal_filter
from .loop import LoopContext, run_vcpu
from .machine import Machine
from .threads import KICK_SIGNAL, VcpuState, VcpuThreads, install_kick_handler

__all__ = ["Machine", "MsrGate", "Interception", "PolicyBinding", "marshal_filter", "LoopContext",
           "run_vcpu", "KICK_SIGNAL", "VcpuState", "VcpuThreads", "install_kick_handler"]
