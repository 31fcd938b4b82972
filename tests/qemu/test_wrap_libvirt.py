"""libvirt for real: a domain whose <emulator> is kvmgate-qemu, started by libvirtd (QEMU as
the unprivileged QEMU user, environment cleared, seccomp sandbox): the guest sees the policy's
answers, the audit records appear, destroy/restart and `kvmgate reload` work; a shim the QEMU
user cannot read or a bad policy stop `virsh start` with the reason.

Skips without libvirt unless KVMGATE_REQUIRE_LIBVIRT=1.  libvirtd/virtlogd are started by hand
when not running (no systemd here) and stopped by pid at the end."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kvmgate.wrap import pvhguest
from kvmgate.wrap.library import shim_path

ROOT = Path(__file__).resolve().parents[2]
URI = "qemu:///system"
HAVE = all(shutil.which(x) for x in ("virsh", "libvirtd", "virtlogd"))
REQUIRE = os.environ.get("KVMGATE_REQUIRE_LIBVIRT") == "1"
QEMU_USER = "libvirt-qemu"
TIMEOUT = 120
EFER = '[[rule]]\nmsr = "IA32_EFER"\naccess = "both"\naction = "allow"\nlog = false\n'

pytestmark = pytest.mark.skipif(not HAVE and not REQUIRE, reason="libvirt is not installed")


def virsh(*args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(["virsh", "-c", URI, *args], check=False, capture_output=True, text=True,
                       timeout=TIMEOUT)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def wait_for(cond, what: str, timeout: float = TIMEOUT):
    """Poll a condition (libvirt has no event we can wait on from here)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def libvirt():
    if not HAVE:
        pytest.fail("KVMGATE_REQUIRE_LIBVIRT=1 but libvirt is not installed")
    started = []
    for daemon in ("virtlogd", "libvirtd"):
        if subprocess.run(["pgrep", "-x", daemon], check=False, capture_output=True).returncode != 0:
            subprocess.run([daemon, "-d"], check=True, timeout=TIMEOUT)
            pid = wait_for(lambda d=daemon: subprocess.run(["pgrep", "-x", d], check=False,
                                                           capture_output=True, text=True).stdout.split(),
                           f"{daemon} to start")
            started.append(int(pid[0]))
    wait_for(lambda: virsh("version", check=False).returncode == 0, "libvirtd to answer")
    yield
    for pid in reversed(started):
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            pass


def python_for_qemu_user() -> str:
    """A Python >= 3.11 the QEMU user can run (libvirt starts the emulator as that user)."""
    for py in ("/usr/bin/python3", sys.executable):
        r = subprocess.run(["su", "-s", "/bin/sh", QEMU_USER, "-c", f"{py} -c 'import tomllib'"],
                           check=False, capture_output=True, timeout=TIMEOUT)
        if r.returncode == 0:
            return py
    pytest.fail(f"no Python >= 3.11 that {QEMU_USER} can run")


@pytest.fixture
def world(libvirt):
    """A directory the QEMU user can read: kvmgate, the shim, the emulator script, the guest."""
    d = Path(tempfile.mkdtemp(prefix="kvmgate-libvirt-", dir="/tmp"))
    d.chmod(0o755)
    shutil.copytree(ROOT / "kvmgate", d / "kvmgate", ignore=shutil.ignore_patterns("__pycache__"))
    shim = d / "shim.so"
    shutil.copy(shim_path(), shim)
    shim.chmod(0o644)
    for sub in ("domains", "run", "log"):
        (d / sub).mkdir()
        (d / sub).chmod(0o777)
    emulator = d / "kvmgate-qemu"
    emulator.write_text("#!/bin/sh\n"
                        f"KVMGATE_DOMAINS={d}/domains KVMGATE_RUN_DIR={d}/run "
                        f"KVMGATE_SHIM_LIBRARY={shim} PYTHONPATH={d} "
                        f'exec {python_for_qemu_user()} -m kvmgate.cli.qemu "$@"\n')
    emulator.chmod(0o755)
    name = f"kvmgate-test-{os.getpid()}"
    yield {"dir": d, "name": name, "shim": shim, "emulator": emulator}
    virsh("destroy", name, check=False)
    virsh("undefine", name, check=False)
    shutil.rmtree(d, ignore_errors=True)


def define(w, accesses, policy_text, wait=0):
    d, name = w["dir"], w["name"]
    pvh = pvhguest.build(accesses, d, vcpus=2, wait=wait)
    pvh.chmod(0o644)
    pol = d / "policy.toml"
    pol.write_text(policy_text)
    pol.chmod(0o644)
    audit = d / "log" / "audit.jsonl"
    (d / "domains" / f"{name}.toml").write_text(f'policy = "{pol}"\naudit = "{audit}"\n')
    serial = d / "log" / "serial.txt"
    (d / "dom.xml").write_text(f"""<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>2</vcpu>
  <os><type arch='x86_64' machine='microvm'>hvm</type><kernel>{pvh}</kernel></os>
  <cpu><topology sockets='1' dies='1' cores='2' threads='1'/></cpu>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>{w['emulator']}</emulator>
    <serial type='file'><source path='{serial}'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
    <qemu:arg value='-device'/><qemu:arg value='isa-debug-exit,iobase=0xf4,iosize=4'/>
  </qemu:commandline>
</domain>
""")
    virsh("define", str(d / "dom.xml"))
    return {"policy": pol, "audit": audit, "serial": serial,
            "log": Path(f"/var/log/libvirt/qemu/{name}.log")}


def log_text(f) -> str:
    return f["log"].read_text(errors="replace") if f["log"].exists() else ""


def test_domain_under_policy_audit_destroy_restart_reload(world):
    f = define(world, [(0x40001234, 0, 0), (0x12345678, 0, 0)],
               '[policy]\ndefault = "allow"\n' + EFER +
               '[[rule]]\nmsr = 0x40001234\naccess = "read"\naction = "constant"\nlog = false\nvalue = 1\n'
               '[[rule]]\nmsr = 0x12345678\naccess = "read"\naction = "ignore"\nlog = true\n', wait=2)
    name = world["name"]
    before = len(log_text(f))
    virsh("start", name)
    wait_for(lambda: f["serial"].exists() and "W" in f["serial"].read_text(), "the guest to spin")
    assert "active in VMM" in log_text(f)[before:]
    virsh("destroy", name)                                      # destroy and start again
    before = len(log_text(f))
    f["serial"].unlink()
    virsh("start", name)
    wait_for(lambda: f["serial"].exists() and "W" in f["serial"].read_text(), "the guest to spin again")
    f["policy"].write_text(f["policy"].read_text().replace("value = 1", "value = 2"))
    r = subprocess.run([sys.executable, "-m", "kvmgate", "reload", name], cwd=world["dir"],
                       env=dict(os.environ, KVMGATE_DOMAINS=str(world["dir"] / "domains"),
                                KVMGATE_RUN_DIR=str(world["dir"] / "run"), PYTHONPATH=str(world["dir"])),
                       check=False, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: "kvmgate: VMM exited" in log_text(f)[before:], "the run-end counters")
    res = pvhguest.parse(f["serial"].read_text())
    assert res["done"]
    assert res[(0, 0x40001234, 0)] == (2, 0) and res[(1, 0x40001234, 0)] == (2, 0)
    assert res[(0, 0x12345678, 0)] == (0, 0)                    # ignore, not KVM's #GP
    assert "kvmgate: reloaded" in log_text(f)[before:]
    recs = [line for line in f["audit"].read_text().splitlines() if '"0x12345678"' in line]
    assert len(recs) >= 2                                       # both vCPUs, this run


@pytest.mark.parametrize("breakage,needle", [("shim", "not readable"), ("policy", "default")])
def test_virsh_start_fails_with_the_reason(world, breakage, needle):
    f = define(world, [(0xCE, 0, 0)], '[policy]\ndefault = "allow"\n' + EFER)
    if breakage == "shim":
        world["shim"].chmod(0o600)                              # root's; the QEMU user cannot read it
    else:
        f["policy"].write_text('[policy]\ndefault = "sometimes"\n')
    r = virsh("start", world["name"], check=False)
    assert r.returncode != 0
    assert needle in r.stderr or needle in log_text(f)
    assert "QEMU is not started" in r.stderr + log_text(f)
    assert not f["serial"].exists() or "R " not in f["serial"].read_text()   # the guest never ran
