"""`kvmgate wrap` (or any VMM launcher) started by a test in its own session, so the test can
kill the whole group, the wrap and the QEMU it started, whatever happened: a failed or timed
out test leaves no orphaned VMM behind (QEMU outlives a killed parent otherwise)."""
from __future__ import annotations

import os
import signal
import subprocess


def start(argv, **kw) -> subprocess.Popen:
    return subprocess.Popen(argv, start_new_session=True, **kw)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the child's process group (a no-op once all of it is gone), then reap."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run(argv, timeout: float, **kw) -> subprocess.CompletedProcess:
    """subprocess.run(capture_output=True, text=True), killing the group at the end (also on
    a timeout, which raises TimeoutExpired as subprocess.run does)."""
    proc = start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)
