"""libvirt for the libvirt tests: virsh, and libvirtd/virtlogd shared safely between test runs.

Without systemd (as on CI here) nobody starts the daemons.  `.ci/run` starts them by hand and
stops them by pid; a test run outside CI starts them itself when they are not running.  Two test
runs may run at once, so the run that started the daemons must not stop them while the other
still uses them: every run holds a shared flock on LOCK for as long as it uses libvirt; the run
that started the daemons takes the lock exclusively before stopping them, which waits until no
other run holds it.  Starting happens under the exclusive lock too, so only one run starts them.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

URI = "qemu:///system"
HAVE = all(shutil.which(x) for x in ("virsh", "libvirtd", "virtlogd"))
REQUIRE = os.environ.get("KVMGATE_REQUIRE_LIBVIRT") == "1"
TIMEOUT = 120
LOCK = "/run/lock/kvmgate-libvirt-tests.lock"
DAEMONS = (("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid"))

needs_libvirt = pytest.mark.skipif(not HAVE and not REQUIRE, reason="libvirt is not installed "
                                   "(apt-get install libvirt-daemon-system libvirt-clients)")


def virsh(*args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(["virsh", "-c", URI, *args], check=False, capture_output=True, text=True,
                       timeout=TIMEOUT)
    if check:
        assert r.returncode == 0, f"virsh {' '.join(args)}: {r.stderr}"
    return r


def wait_for(cond, what: str, timeout: float = TIMEOUT):
    """Poll a condition: libvirt offers no event a test can wait on for these."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    """A live process (a zombie waiting for init counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def running_pid(pidfile: str) -> int | None:
    try:
        pid = int(Path(pidfile).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if alive(pid) else None


def start_daemon(name: str, pidfile: str) -> int:
    """`NAME -d` returns once the daemon is up (it waits for its forked child); its pid from
    the pidfile it writes."""
    subprocess.run([name, "-d", "-p", pidfile], check=True, timeout=TIMEOUT,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return wait_for(lambda: running_pid(pidfile), f"{name} to write {pidfile}")


def stop_daemon(pid: int, name: str) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    wait_for(lambda: not alive(pid), f"{name} (pid {pid}) to stop")


@contextmanager
def libvirt_daemons():
    """libvirtd and virtlogd running for the duration; started (and then stopped, by pid) only
    when they were not running, and never stopped under another test run."""
    if not HAVE:
        pytest.fail("KVMGATE_REQUIRE_LIBVIRT=1 but libvirt is not installed")
    os.makedirs(os.path.dirname(LOCK), exist_ok=True)
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    started: list[tuple[int, str]] = []
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            for name, pidfile in DAEMONS:
                if running_pid(pidfile) is None and subprocess.run(
                        ["pgrep", "-x", name], check=False, capture_output=True).returncode != 0:
                    started.append((start_daemon(name, pidfile), name))
            wait_for(lambda: virsh("version", check=False).returncode == 0, "libvirtd to answer")
        except BaseException:
            for pid, name in reversed(started):
                stop_daemon(pid, name)
            raise
        fcntl.flock(fd, fcntl.LOCK_SH)                # others may use them now
        yield
        if started:
            fcntl.flock(fd, fcntl.LOCK_EX)            # waits for every other run to finish
            for pid, name in reversed(started):
                stop_daemon(pid, name)
    finally:
        os.close(fd)                                  # releases the lock
