"""libvirt for the libvirt tests: virsh, libvirtd/virtlogd shared safely between test runs, and
throwaway domains whose <emulator> is kvmgate-qemu.

Without systemd (as on CI here) nobody starts the daemons.  `.ci/run` starts them by hand and
stops them by pid; a test run outside CI starts them itself when they are not running (their
pidfile names no live process: a stopped daemon may linger as a zombie, which `pgrep` would
count).  Two test runs may run at once, so the run that started the daemons must not stop them
while another still uses them (see libvirt_daemons).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from kvmgate.wrap import pvhguest
from kvmgate.wrap.library import shim_path

URI = "qemu:///system"
HAVE = all(shutil.which(x) for x in ("virsh", "libvirtd", "virtlogd"))
REQUIRE = os.environ.get("KVMGATE_REQUIRE_LIBVIRT") == "1"
TIMEOUT = 120
LOCK_DIR = "/run/lock"
ROOT = Path(__file__).resolve().parents[2]
QEMU_USER = "libvirt-qemu"
EFER = '[[rule]]\nmsr = "IA32_EFER"\naccess = "both"\naction = "allow"\nlog = false\n'
# MSR 0x35 (MSR_CORE_THREAD_COUNT) is answered by QEMU from the domain's topology
TOPOLOGY = "<topology sockets='1' dies='1' cores='2' threads='1'/>"
# their default pidfiles when run as root (systemd, `.ci/run` and these tests use them too)
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
    when they were not running, and never stopped under another test run.

    Two locks: START (exclusive, held briefly) serialises starting and stopping; USERS is held
    shared by every run using the daemons, and exclusively by the run that started them before
    it stops them, which waits until the other runs are done."""
    if not HAVE:
        pytest.fail("KVMGATE_REQUIRE_LIBVIRT=1 but libvirt is not installed")
    os.makedirs(LOCK_DIR, exist_ok=True)
    start = os.open(os.path.join(LOCK_DIR, "kvmgate-libvirt-tests.start"), os.O_RDWR | os.O_CREAT, 0o600)
    users = os.open(os.path.join(LOCK_DIR, "kvmgate-libvirt-tests.users"), os.O_RDWR | os.O_CREAT, 0o600)
    started: list[tuple[int, str]] = []
    try:
        fcntl.flock(start, fcntl.LOCK_EX)
        try:
            for name, pidfile in DAEMONS:
                if running_pid(pidfile) is None:
                    started.append((start_daemon(name, pidfile), name))
            wait_for(lambda: virsh("version", check=False).returncode == 0, "libvirtd to answer")
        except BaseException:
            for pid, name in reversed(started):
                stop_daemon(pid, name)
            raise
        fcntl.flock(users, fcntl.LOCK_SH)
        fcntl.flock(start, fcntl.LOCK_UN)
        yield
        if started:
            fcntl.flock(start, fcntl.LOCK_EX)         # nobody starts using them from now on
            fcntl.flock(users, fcntl.LOCK_EX)         # waits for every other run to finish
            for pid, name in reversed(started):
                stop_daemon(pid, name)
    finally:
        os.close(users)                               # closing releases the locks
        os.close(start)


def python_for_qemu_user() -> str:
    """A Python >= 3.11 the QEMU user can run (libvirt starts the emulator as that user)."""
    for py in ("/usr/bin/python3", sys.executable):
        r = subprocess.run(["su", "-s", "/bin/sh", QEMU_USER, "-c", f"{py} -c 'import tomllib'"],
                           check=False, capture_output=True, timeout=TIMEOUT)
        if r.returncode == 0:
            return py
    pytest.fail(f"no Python >= 3.11 that {QEMU_USER} can run")


class Emulator:
    """kvmgate-qemu as libvirt sees it: a script in a directory the QEMU user can read, with
    kvmgate, the shim, the domains' settings and pidfiles.  One per test session: libvirt
    probes each new <emulator> path (twice) at define time, so domains share it."""

    def __init__(self):
        self.dir = d = Path(tempfile.mkdtemp(prefix="kvmgate-libvirt-", dir="/tmp"))
        d.chmod(0o755)
        shutil.copytree(ROOT / "kvmgate", d / "kvmgate", ignore=shutil.ignore_patterns("__pycache__"))
        self.shim = d / "shim.so"
        shutil.copy(shim_path(), self.shim)
        self.shim.chmod(0o644)
        for sub in ("domains", "run"):
            (d / sub).mkdir()
            (d / sub).chmod(0o777)
        self.env = {"KVMGATE_DOMAINS": str(d / "domains"), "KVMGATE_RUN_DIR": str(d / "run")}
        self.path = d / "kvmgate-qemu"
        self.write(self.path, self.shim)

    def write(self, path: Path, shim: Path) -> Path:
        """An emulator script at `path` preloading `shim`."""
        path.write_text("#!/bin/sh\n" + "".join(f"{k}={v} " for k, v in self.env.items()) +
                        f"KVMGATE_SHIM_LIBRARY={shim} PYTHONPATH={self.dir} "
                        f'exec {python_for_qemu_user()} -m kvmgate.cli.qemu "$@"\n')
        path.chmod(0o755)
        return path

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Domain:
    """A throwaway domain (unique name) whose <emulator> is the session's kvmgate-qemu, its
    guest, policy and logs in its own directory; destroy and undefine it with cleanup()."""

    def __init__(self, name: str, emulator: Emulator):
        self.name = name
        self.dir = d = Path(tempfile.mkdtemp(prefix="dom-", dir=emulator.dir))
        d.chmod(0o755)
        (d / "log").mkdir()
        (d / "log").chmod(0o777)
        self.shim = emulator.shim
        self.env = emulator.env
        self.emulator = emulator.path
        self.settings = emulator.dir / "domains" / f"{name}.toml"
        self.policy = d / "policy.toml"
        self.audit = d / "log" / "audit.jsonl"
        self.serial = d / "log" / "serial.txt"
        self.log = Path(f"/var/log/libvirt/qemu/{name}.log")
        self.defined = False

    def define(self, accesses, policy_text: str, wait: int = 0, settings: bool = True) -> dict:
        elf = pvhguest.build(accesses, self.dir, vcpus=2, wait=wait)
        elf.chmod(0o644)
        self.policy.write_text(policy_text)
        self.policy.chmod(0o644)
        if settings:
            self.settings.write_text(
                f'policy = "{self.policy}"\naudit = "{self.audit}"\n')
        xml = self.dir / "dom.xml"
        xml.write_text(f"""<domain type='kvm'>
  <name>{self.name.replace('&', '&amp;')}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>2</vcpu>
  <os><type arch='x86_64' machine='microvm'>hvm</type><kernel>{elf}</kernel></os>
  <cpu>{TOPOLOGY}</cpu>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>{self.emulator}</emulator>
    <serial type='file'><source path='{self.serial}'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
    <qemu:arg value='-device'/><qemu:arg value='isa-debug-exit,iobase=0xf4,iosize=4'/>
  </qemu:commandline>
</domain>
""")
        virsh("define", str(xml))
        self.defined = True
        return {"policy": self.policy, "audit": self.audit, "serial": self.serial, "log": self.log}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def serial_text(self) -> str:
        return self.serial.read_text(errors="replace") if self.serial.exists() else ""

    def reload(self) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kvmgate", "reload", self.name], cwd=ROOT,
                              env=dict(os.environ, **self.env), check=False, capture_output=True,
                              text=True, timeout=TIMEOUT)

    def cleanup(self) -> None:
        if self.defined:
            virsh("destroy", self.name, check=False)
            virsh("undefine", self.name, check=False)
        self.shim.chmod(0o644)                      # a test may have taken it from QEMU's user
        self.settings.unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)
