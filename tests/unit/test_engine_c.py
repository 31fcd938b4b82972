"""The C engine under AddressSanitizer and UndefinedBehaviorSanitizer: csrc/test_engine.c feeds
random and mutated tables, random exits, concurrent emulate writes and two-thread ring traffic
(see its header); any out-of-bounds access, UB, torn record or lost update fails it.  Also: the
engine compiles warning-free at -O2 with -Wall -Wextra -Werror, and needs nothing from libc but
clock_gettime (kg_record_fill) and memset (the init functions)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
CC = shutil.which("gcc") or shutil.which("cc")
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler")


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, **kw)


def test_harness_under_asan_and_ubsan(tmp_path):
    exe = tmp_path / "test_engine"
    cc = _run([CC, "-std=gnu11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-pthread",
               "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
               f"-I{CSRC}", str(CSRC / "test_engine.c"), "-o", str(exe)])
    assert cc.returncode == 0, cc.stderr
    for seed in ("0x1234567", "0xdecafbad"):
        r = _run([str(exe), seed, "2000"], env={"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
                                                 "UBSAN_OPTIONS": "print_stacktrace=1"})
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"ok seed={int(seed, 16):#x}" in r.stdout
        assert "accepted after mutation: 0" not in r.stdout     # mutations reach decide too


def test_engine_compiles_clean_and_calls_no_libc_on_the_exit_path(tmp_path):
    obj = tmp_path / "engine.o"
    cc = _run([CC, "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-c",
               str(CSRC / "engine.c"), "-o", str(obj)])
    assert cc.returncode == 0, cc.stderr
    nm = _run(["nm", "-u", str(obj)])
    assert nm.returncode == 0, nm.stderr
    undefined = {line.split()[-1] for line in nm.stdout.splitlines() if line.strip()}
    assert undefined <= {"clock_gettime", "memset"}, undefined
