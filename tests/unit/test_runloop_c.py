"""The C run loop (csrc/runloop.c) without a kernel: csrc/test_runloop.c drives kg_loop_run
through a scripted fake KVM_RUN under AddressSanitizer and UndefinedBehaviorSanitizer and checks
every answer, record and count against kg_decide (see its header).  Also: it compiles
warning-free at -O2 with -Wall -Wextra -Werror and calls nothing but ioctl(2) and the engine."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
CC = shutil.which("gcc") or shutil.which("cc")
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler")


def _run(cmd, **kw):
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240, **kw)


def test_run_loop_against_a_fake_kernel_under_asan_and_ubsan(tmp_path):
    exe = tmp_path / "test_runloop"
    cc = _run([CC, "-std=gnu11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-pthread",
               "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
               f"-I{CSRC}", str(CSRC / "test_runloop.c"), "-o", str(exe)])
    assert cc.returncode == 0, cc.stderr
    for seed in ("0x1234567", "0xdecafbad"):
        r = _run([str(exe), seed, "600"], env={"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
                                                "UBSAN_OPTIONS": "print_stacktrace=1"})
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"ok seed={int(seed, 16):#x} runs=600" in r.stdout
        records, counted = (int(x.split("=")[1]) for x in r.stdout.split()[3:5])
        assert records > 0 and counted > 0          # both audit paths were exercised


def test_run_loop_compiles_clean_and_calls_only_ioctl_and_the_engine(tmp_path):
    obj = tmp_path / "runloop.o"
    cc = _run([CC, "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{CSRC}", "-c",
               str(CSRC / "runloop.c"), "-o", str(obj)])
    assert cc.returncode == 0, cc.stderr
    nm = _run(["nm", "-u", str(obj)])
    assert nm.returncode == 0, nm.stderr
    undefined = {line.split()[-1] for line in nm.stdout.splitlines() if line.strip()}
    assert undefined <= {"ioctl", "__errno_location", "kg_decide", "kg_host_done",
                         "kg_record_fill", "kg_ring_push"}, undefined
