"""Compile-and-run helpers for the C harnesses in csrc/ (tests/unit/test_engine_c.py,
tests/unit/test_runloop_c.py): a harness built with -Wall -Wextra -Werror under
AddressSanitizer and UndefinedBehaviorSanitizer and run with seeds; an object file's undefined
symbols (what the code calls outside itself)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CC = shutil.which("gcc") or shutil.which("cc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler")
WARN = ["-std=gnu11", "-Wall", "-Wextra", "-Werror"]


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240, **kw)


def sanitized(harness: str, tmp_path: Path) -> Path:
    """csrc/`harness` built with ASan + UBSan (any report aborts); the executable's path."""
    exe = tmp_path / Path(harness).stem
    cc = run([CC, *WARN, "-O1", "-g", "-pthread", "-fsanitize=address,undefined",
              "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", f"-I{CSRC}",
              str(CSRC / harness), "-o", str(exe)])
    assert cc.returncode == 0, cc.stderr
    return exe


def run_seeds(exe: Path, iterations: int, seeds=("0x1234567", "0xdecafbad")) -> list[str]:
    """Run the harness once per seed; its stdout lines (each run must exit 0 and say ok)."""
    out = []
    for seed in seeds:
        r = run([str(exe), seed, str(iterations)],
                env={"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
                     "UBSAN_OPTIONS": "print_stacktrace=1"})
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"ok seed={int(seed, 16):#x}" in r.stdout
        out.append(r.stdout)
    return out


def undefined_symbols(source: str, tmp_path: Path) -> set[str]:
    """The undefined symbols of csrc/`source` compiled alone at -O2 (warning-free)."""
    obj = tmp_path / (Path(source).stem + ".o")
    cc = run([CC, *WARN, "-O2", f"-I{CSRC}", "-c", str(CSRC / source), "-o", str(obj)])
    assert cc.returncode == 0, cc.stderr
    nm = run(["nm", "-u", str(obj)])
    assert nm.returncode == 0, nm.stderr
    return {line.split()[-1] for line in nm.stdout.splitlines() if line.strip()}
