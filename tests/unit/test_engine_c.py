"""The C engine under AddressSanitizer and UndefinedBehaviorSanitizer: csrc/test_engine.c feeds
random and mutated tables, random exits, concurrent emulate writes and two-thread ring traffic
(see its header); any out-of-bounds access, UB, torn record or lost update fails it.  Also: the
engine compiles warning-free at -O2 with -Wall -Wextra -Werror, and needs nothing from libc but
clock_gettime (kg_record_fill) and memset (the init functions)."""
from ..csan import needs_cc, run_seeds, sanitized, undefined_symbols

pytestmark = needs_cc


def test_harness_under_asan_and_ubsan(tmp_path):
    for out in run_seeds(sanitized("test_engine.c", tmp_path), 2000):
        assert "accepted after mutation: 0" not in out     # mutations reach decide too


def test_engine_compiles_clean_and_calls_no_libc_on_the_exit_path(tmp_path):
    assert undefined_symbols("engine.c", tmp_path) <= {"clock_gettime", "memset"}
