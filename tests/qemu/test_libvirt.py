"""libvirt for real, beyond tests/qemu/test_wrap_libvirt.py: a domain whose name has a comma
(libvirt passes `-name guest=a,,b`), QEMU's own answer for MSR 0x35 from the domain's
<topology> kept under a policy that does not name it, a bad policy refused by
`kvmgate reload DOMAIN` while the guest keeps the old one, and `virsh start` failing for a
domain that has no kvmgate settings.

Skips without libvirt unless KVMGATE_REQUIRE_LIBVIRT=1 (.ci/run sets it)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from kvmgate.wrap import pvhguest
from kvmgate.wrap.library import shim_path

from .libvirt_host import TIMEOUT, libvirt_daemons, needs_libvirt, virsh, wait_for

ROOT = Path(__file__).resolve().parents[2]
QEMU_USER = "libvirt-qemu"
EFER = '[[rule]]\nmsr = "IA32_EFER"\naccess = "both"\naction = "allow"\nlog = false\n'
CONST = ('[policy]\ndefault = "allow"\n' + EFER + '[[rule]]\nmsr = 0x40001234\naccess = "read"\n'
         'action = "constant"\nlog = true\nvalue = {}\n')
# 1 socket, 2 cores, 1 thread each: MSR_CORE_THREAD_COUNT = cores << 16 | (cores * threads), QEMU's answer
TOPOLOGY = "<topology sockets='1' dies='1' cores='2' threads='1'/>"
CORE_THREAD_COUNT = (2 << 16) | 2

pytestmark = needs_libvirt


@pytest.fixture(scope="module")
def daemons():
    with libvirt_daemons():
        yield


def python_for_qemu_user() -> str:
    """A Python >= 3.11 the QEMU user can run (libvirt starts the emulator as that user)."""
    for py in ("/usr/bin/python3", sys.executable):
        r = subprocess.run(["su", "-s", "/bin/sh", QEMU_USER, "-c", f"{py} -c 'import tomllib'"],
                           check=False, capture_output=True, timeout=TIMEOUT)
        if r.returncode == 0:
            return py
    pytest.fail(f"no Python >= 3.11 that {QEMU_USER} can run")


class Domain:
    """A throwaway domain (unique name) whose <emulator> is kvmgate-qemu, in a directory the
    QEMU user can read; destroyed and undefined by the fixture whatever happens."""

    def __init__(self, name: str):
        self.name = name
        self.dir = d = Path(tempfile.mkdtemp(prefix="kvmgate-libvirt-", dir="/tmp"))
        d.chmod(0o755)
        shutil.copytree(ROOT / "kvmgate", d / "kvmgate", ignore=shutil.ignore_patterns("__pycache__"))
        self.shim = d / "shim.so"
        shutil.copy(shim_path(), self.shim)
        self.shim.chmod(0o644)
        for sub in ("domains", "run", "log"):
            (d / sub).mkdir()
            (d / sub).chmod(0o777)
        self.env = {"KVMGATE_DOMAINS": str(d / "domains"), "KVMGATE_RUN_DIR": str(d / "run")}
        self.emulator = d / "kvmgate-qemu"
        self.emulator.write_text(
            "#!/bin/sh\n" + "".join(f"{k}={v} " for k, v in self.env.items()) +
            f"KVMGATE_SHIM_LIBRARY={self.shim} PYTHONPATH={d} "
            f'exec {python_for_qemu_user()} -m kvmgate.cli.qemu "$@"\n')
        self.emulator.chmod(0o755)
        self.policy = d / "policy.toml"
        self.audit = d / "log" / "audit.jsonl"
        self.serial = d / "log" / "serial.txt"
        self.log = Path(f"/var/log/libvirt/qemu/{name}.log")
        self.defined = False

    def define(self, accesses, policy_text: str, wait: int = 0, settings: bool = True) -> None:
        elf = pvhguest.build(accesses, self.dir, vcpus=2, wait=wait)
        elf.chmod(0o644)
        self.policy.write_text(policy_text)
        self.policy.chmod(0o644)
        if settings:
            (self.dir / "domains" / f"{self.name}.toml").write_text(
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
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def domain(daemons, request):
    made = []

    def make(suffix: str = "") -> Domain:
        d = Domain(f"kvmgate-lv-{uuid.uuid4().hex[:8]}{suffix}")
        made.append(d)
        return d
    yield make
    for d in made:
        d.cleanup()


def test_comma_name_topology_answer_and_audit(domain):
    """libvirt doubles the comma in -name guest=...; kvmgate-qemu still finds the domain's
    settings, the guest sees the policy's constant on both vCPUs, QEMU's own 0x35 answer, and
    the audit records of both vCPUs."""
    d = domain(",x")
    d.define([(0x40001234, 0, 0), (0x35, 0, 0)], CONST.format(7))
    before = len(d.log_text())
    virsh("start", d.name)
    wait_for(lambda: "DONE" in d.serial_text(), "the guest to finish")
    wait_for(lambda: "kvmgate: VMM exited" in d.log_text()[before:], "the run-end counters")
    log = d.log_text()[before:]
    assert f"guest={d.name.replace(',', ',,')}" in log          # libvirt's doubled comma
    assert f"domain {d.name}: policy {d.policy}" in log and "active in VMM" in log
    res = pvhguest.parse(d.serial_text())
    for cpu in (0, 1):
        assert res[(cpu, 0x40001234, 0)] == (7, 0)
        assert res[(cpu, 0x35, 0)] == (CORE_THREAD_COUNT, 0)
    recs = [json.loads(x) for x in d.audit.read_text().splitlines()]
    mine = [r for r in recs if r["msr"] == "0x40001234"]
    assert sorted(r["vcpu"] for r in mine) == [0, 1]
    assert {r["action"] for r in mine} == {"constant"} and {r["value"] for r in mine} == {"0x0"}
    assert not any(r["msr"] == "0x35" for r in recs)            # QEMU's, not the policy's


def test_reload_refuses_a_bad_policy_and_keeps_the_old_one(domain):
    """The guest spins until it reads 2: a bad policy is refused (the guest still reads 1),
    then the good one lets it finish."""
    d = domain()
    d.define([(0x40001234, 0, 0)], CONST.format(1), wait=2)
    before = len(d.log_text())
    virsh("start", d.name)
    wait_for(lambda: "W" in d.serial_text(), "the guest to spin")
    wait_for(lambda: "active in VMM" in d.log_text()[before:], "the shim to be active")
    d.policy.write_text(CONST.format(2).replace('"constant"', '"sometimes"'))
    r = d.reload()
    assert r.returncode == 0, r.stderr
    wait_for(lambda: "reload refused, old policy stays" in d.log_text()[before:], "the refusal")
    assert "sometimes" in d.log_text()[before:]                   # the reason names the field
    assert "DONE" not in d.serial_text()                          # still spinning on 1
    assert virsh("domstate", d.name).stdout.strip() == "running"
    d.policy.write_text(CONST.format(2))
    r = d.reload()
    assert r.returncode == 0, r.stderr
    wait_for(lambda: "DONE" in d.serial_text(), "the guest to read the reloaded value")
    assert pvhguest.parse(d.serial_text())[(0, 0x40001234, 0)] == (2, 0)
    assert "kvmgate: reloaded" in d.log_text()[before:]


def test_start_fails_without_settings_and_reload_says_why(domain):
    d = domain()
    d.define([(0xCE, 0, 0)], CONST.format(1), settings=False)
    r = virsh("start", d.name, check=False)
    assert r.returncode != 0
    assert "no kvmgate settings" in r.stderr and "QEMU is not started" in r.stderr
    assert d.serial_text() == ""                                  # the guest never ran
    assert virsh("domstate", d.name).stdout.strip() == "shut off"
    r = d.reload()
    assert r.returncode == 2 and "no kvmgate settings" in r.stderr and "Traceback" not in r.stderr
