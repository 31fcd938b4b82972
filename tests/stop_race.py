"""A stand-in for VcpuThreads that plays the lost-stop race (docs/kvm-msr.md §4): its stop()
(as VcpuThreads.stop: `stopping` first, then the kick's immediate_exit; its signal is spent,
the thread being outside KVM_RUN) runs right after the vCPU loop's first look at `stopping`.
That is the supervisor acting on a SIGINT the kernel delivered to this vCPU's thread, which
woke both at once.  Used by the unit tier (a fake kvm_run) and the kvm tier (a real vCPU)."""


class StopBetween:
    """Pass it as LoopContext's threads; `vcpu` is the one the loop runs (fake or real)."""

    def __init__(self, vcpu):
        self.vcpu, self.looks, self.kicks, self._stopping = vcpu, 0, 0, False

    @property
    def stopping(self):
        seen = self._stopping
        self.looks += 1
        if self.looks == 1:
            self._stopping = True
            self.vcpu.set_immediate_exit(True)
        return seen

    def interrupted(self, st):
        self.kicks += 1
