"""The bare C KVM_RUN loop (exit_loop.c, shipped with the package) that exit benchmarks compare
against, built with the host C compiler (-Wall -Wextra -Werror) into a temporary directory that
is removed once the library is loaded."""
from __future__ import annotations

import ctypes as C
import functools
import os
import shutil
import subprocess
import tempfile
from importlib import resources

from .common import BenchError

SOURCE = "exit_loop.c"


@functools.lru_cache(maxsize=1)
def c_loop():
    """The loaded library (kvmgate_bench_loop(vcpu_fd, kvm_run *) -> MSR exits; the
    introspection floor's kvmgate_bench_event_loop and kvmgate_bench_echo); BenchError saying
    why when it cannot be built."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise BenchError("cannot build the C baseline: no C compiler (cc/gcc; or set CC)")
    src = resources.files(__package__).joinpath(SOURCE)
    if not src.is_file():
        raise BenchError(f"cannot build the C baseline: {SOURCE} is missing from the installed package")
    with tempfile.TemporaryDirectory(prefix="kvmgate-bench-") as tmp:
        with resources.as_file(src) as path:
            out = os.path.join(tmp, "exit_loop.so")
            p = subprocess.run(check=False, args=[cc, "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                                "-o", out, str(path)], capture_output=True, text=True)
            if p.returncode:
                raise BenchError(f"cannot build the C baseline with {cc}: "
                                 f"{(p.stderr.strip().splitlines() or ['failed'])[-1]}")
        lib = C.CDLL(out)           # mapped: the file can go with the directory
    lib.kvmgate_bench_loop.argtypes = [C.c_int, C.c_void_p]
    lib.kvmgate_bench_loop.restype = C.c_long
    lib.kvmgate_bench_event_loop.argtypes = [C.c_int, C.c_void_p, C.c_int, C.c_int, C.c_int, C.c_long]
    lib.kvmgate_bench_event_loop.restype = C.c_long
    lib.kvmgate_bench_echo.argtypes = [C.c_int, C.c_int, C.c_int]
    lib.kvmgate_bench_echo.restype = C.c_long
    return lib
