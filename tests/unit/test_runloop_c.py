"""The C run loop (csrc/runloop.c) and audit drain (csrc/auditfmt.c) without a kernel:
csrc/test_runloop.c drives kg_loop_run through a scripted fake KVM_RUN and kg_audit_drain
through random records under AddressSanitizer and UndefinedBehaviorSanitizer, and checks every
answer, record, count, kept exit and formatted line (see its header).  Also: both compile
warning-free at -O2 with -Wall -Wextra -Werror; the loop calls nothing but ioctl(2) and the
engine."""
from ..csan import needs_cc, run_seeds, sanitized, undefined_symbols

pytestmark = needs_cc


def test_run_loop_and_audit_drain_under_asan_and_ubsan(tmp_path):
    for out in run_seeds(sanitized("test_runloop.c", tmp_path), 600):
        fields = dict(x.split("=", 1) for x in out.split()[1:])
        assert fields["runs"] == "600"
        # every path was exercised: records, counted decisions, lines, suppressed ones
        assert all(int(fields[k]) > 0 for k in ("records", "counted", "lines", "suppressed")), out


def test_run_loop_compiles_clean_and_calls_only_ioctl_and_the_engine(tmp_path):
    # clock_gettime(CLOCK_MONOTONIC_COARSE): the main thread's tick, a vDSO read (no lock)
    assert undefined_symbols("runloop.c", tmp_path) <= {
        "ioctl", "__errno_location", "kg_decide", "kg_host_done", "kg_record_fill", "kg_ring_push",
        "clock_gettime"}


def test_audit_drain_compiles_clean(tmp_path):
    assert undefined_symbols("auditfmt.c", tmp_path) <= {
        "calloc", "malloc", "realloc", "free", "memcpy", "memset", "memcmp", "strlen", "snprintf",
        "sprintf", "strtod", "atoi", "strtol", "__sprintf_chk", "__snprintf_chk", "__stack_chk_fail"}
