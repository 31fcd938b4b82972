"""How the exit loop and the write-interception router answer MSR exits, checked on the kernel.

docs/kvm-msr.md §4: a completed WRMSR exit stores nothing and its `data` is the guest's value,
not something for user space to fill in; an access the owner's filter denies while the owner
has no FILTER exits must end in #GP exactly as the kernel alone would do it."""
import pytest

from kvmgate import (
    DEFAULT_ALLOW,
    EXIT_REASON_FILTER,
    READ,
    WRITE,
    Machine,
    MsrFilter,
    MsrRange,
)

pytestmark = pytest.mark.kvm
LSTAR = 0xC0000082
RUN_MSR_DATA = 48 // 8        # kvm_run.msr.data: byte 48 (docs/kvm-msr.md §1), as a u64 index


def test_write_exit_completion_does_not_write_data_back():
    seen = []

    def handler(ex):
        seen.append(ex)
        return 0x99 if ex.is_write else 0x1234      # a value returned for a write means nothing

    with Machine("mov ecx, 0x10\nmov eax, 0x11223344\nmov edx, 0x55667788\nwrmsr\n"
                 "rdmsr\nmov r8, rax\nmov r9, rdx\nhlt") as m:
        m.enable_user_space_msr(EXIT_REASON_FILTER)
        m.set_msr_filter(MsrFilter([MsrRange(READ | WRITE, 0x10, 1, b"\x00")], DEFAULT_ALLOW))
        m.on_msr(handler)
        r = m.run(timeout=10)
        wr, rd = r.msr_exits
        assert (wr.is_write, wr.data, wr.reply) == (True, 0x5566778811223344, None)
        assert (rd.is_write, rd.reply) == (False, 0x1234)
        assert (r.regs.r8, r.regs.r9) == (0x1234, 0)
        assert r.gp_faults == []


def test_write_exit_leaves_the_guest_value_in_the_run_area():
    with Machine("mov ecx, 0x10\nmov eax, 0x11223344\nmov edx, 0x55667788\nwrmsr\nhlt") as m:
        m.enable_user_space_msr(EXIT_REASON_FILTER)
        m.set_msr_filter(MsrFilter([MsrRange(WRITE, 0x10, 1, b"\x00")], DEFAULT_ALLOW))
        m.on_msr(lambda ex: 0x99)
        r = m.run(timeout=10)
        assert r.msr_exits[0].reply is None and r.gp_faults == []
        # the HLT exit after it does not touch the MSR member: what is there is what the
        # kernel put there, unless the exit loop wrote a reply into a write exit
        assert m.vcpus[0].run_struct().msr.data == 0x5566778811223344


# The owner denies reads of 0x10 and writes of LSTAR in its filter and has no user-space exits:
# the kernel alone answers both with #GP.  Intercepting writes of LSTAR turns FILTER exits on,
# which must not change that (the owner's handler would answer 0x1234 / accept the write).
OWNER = MsrFilter([MsrRange(READ, 0x10, 1, b"\x00"), MsrRange(WRITE, LSTAR, 1, b"\x00")], DEFAULT_ALLOW)
GUEST = """
    mov ecx, 0x10
    rdmsr
    mov r8, rax
    mov ecx, 0xc0000082
    mov eax, 0x1000
    xor edx, edx
    wrmsr
    mov ecx, 0x1b
    rdmsr
    mov r9, rax
    hlt
"""


def _run(intercept: bool):
    owner_calls, tool_calls = [], []
    with Machine(GUEST) as m:
        m.set_msr_filter(OWNER)
        m.enable_user_space_msr(0)

        @m.on_msr
        def owner(ex):
            owner_calls.append(ex)
            return None if ex.is_write else 0x1234

        if intercept:
            m.intercept_msr_writes({LSTAR, 0x1b}, lambda ex: tool_calls.append(ex))
        r = m.run(timeout=10)
        return r, owner_calls, tool_calls


def test_router_injects_gp_like_the_kernel_when_the_owner_has_no_filter_exits():
    alone, owner_alone, _ = _run(intercept=False)
    routed, owner_routed, tool = _run(intercept=True)
    assert [f.index for f in alone.gp_faults] == [0x10, LSTAR]     # the kernel's answer
    assert [(f.index, f.rip) for f in routed.gp_faults] == [(f.index, f.rip) for f in alone.gp_faults]
    assert routed.regs.r8 == alone.regs.r8 == 0
    assert routed.regs.r9 == alone.regs.r9
    assert owner_alone == [] and owner_routed == [] and tool == []


def test_router_follows_an_owner_filter_and_mask_set_after_the_interception():
    """The owner may change its filter and mask on their own while writes are intercepted: the
    router must answer by the owner's current filter (LSTAR writes now denied: #GP as the
    kernel alone, the tool never sees them), not the one it was built with (allow all)."""
    alone, _, _ = _run(intercept=False)
    tool_calls = []
    with Machine(GUEST) as m:
        m.on_msr(lambda ex: None if ex.is_write else 0x1234)
        m.intercept_msr_writes({LSTAR, 0x1b}, lambda ex: tool_calls.append(ex))
        m.set_msr_filter(OWNER)
        m.enable_user_space_msr(0)
        r = m.run(timeout=10)
        assert [(f.index, f.rip) for f in r.gp_faults] == [(f.index, f.rip) for f in alone.gp_faults]
        assert m.get_msrs([LSTAR])[LSTAR] != 0x1000
    assert tool_calls == []
    assert r.regs.r8 == 0 and r.regs.r9 == alone.regs.r9
