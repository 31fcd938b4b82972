"""The C MSR event path (csrc/kvmi_event.c) without a kernel, under AddressSanitizer and
UndefinedBehaviorSanitizer: csrc/test_kvmi_event.c drives kg_ev_msr_write through a fake
KVM_GET_MSRS / KVM_SET_MSRS and a real socketpair, every reply shape and every reason not to
start (see its header).  Also: it compiles warning-free at -O2 and calls nothing that allocates
or locks (the exit path's rule): only ioctl, the socket calls, poll, sched_yield, the vDSO
clock and memcpy."""
from ..csan import needs_cc, run_seeds, sanitized, undefined_symbols

pytestmark = needs_cc


def test_event_path_under_asan_and_ubsan(tmp_path):
    for out in run_seeds(sanitized("test_kvmi_event.c", tmp_path), 3000):
        fields = dict(x.split("=", 1) for x in out.split()[1:])
        assert fields["iterations"] == "3000"
        # every outcome was exercised: answered in C, handed to Python, not started
        assert all(int(fields[k]) > 0 for k in ("done", "handed", "python")), out


def test_event_path_compiles_clean_and_calls_no_allocator_or_lock(tmp_path):
    assert undefined_symbols("kvmi_event.c", tmp_path) <= {
        "ioctl", "__errno_location", "send", "recv", "poll", "sched_yield", "clock_gettime",
        "memcpy", "memset"}
