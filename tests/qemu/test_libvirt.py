"""libvirt for real, beyond tests/qemu/test_wrap_libvirt.py: a domain whose name has a comma
(libvirt passes `-name guest=a,,b`), the audit's first record saying the shim is active, QEMU's own answer for MSR 0x35 from the domain's
<topology> kept under a policy that does not name it, a bad policy refused by
`kvmgate reload DOMAIN` while the guest keeps the old one, and `virsh start` failing for a
domain that has no kvmgate settings.

Skips without libvirt unless KVMGATE_REQUIRE_LIBVIRT=1 (.ci/run sets it)."""
from __future__ import annotations

import json
import shutil
import subprocess
import uuid

import pytest
from jsonschema import Draft202012Validator

from kvmgate.schemas import schema
from kvmgate.wrap import pvhguest

from .libvirt_host import EFER, Domain, needs_libvirt, virsh, wait_for

CONST = ('[policy]\ndefault = "allow"\n' + EFER + '[[rule]]\nmsr = 0x40001234\naccess = "read"\n'
         'action = "constant"\nlog = true\nvalue = {}\n')
# TOPOLOGY (1 socket, 2 cores, 1 thread each): MSR_CORE_THREAD_COUNT = cores << 16 | (cores * threads)
CORE_THREAD_COUNT = (2 << 16) | 2

pytestmark = needs_libvirt


@pytest.fixture
def domain(emulator):
    made = []

    def make(suffix: str = "") -> Domain:
        d = Domain(f"kvmgate-lv-{uuid.uuid4().hex[:8]}{suffix}", emulator)
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
    r = virsh("start", d.name, check=False)
    if r.returncode != 0:
        # This guest is done within milliseconds of `cont` and powers QEMU off; when that beats
        # libvirt's last monitor exchange of the start, virsh reports the start as failed (seen
        # under load).  That, and only that, is accepted: the guest must have run to the end.
        assert "qemu unexpectedly closed the monitor" in r.stderr, r.stderr
        assert "DONE" in d.serial_text(), r.stderr
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
    first = recs[0]                                             # the shim said it is active
    assert (first["event"], first["domain"], first["policy"]) == ("active", d.name, str(d.policy))
    assert f"active in VMM pid {first['pid']}" in log
    validator = Draft202012Validator(schema("audit"))
    for r in recs:
        validator.validate(r)
    recs = recs[1:]
    assert not any("event" in r for r in recs)
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
    # the log reaches the file through virtlogd, after the fact: wait for each line, never
    # assume it is there because the guest already saw the effect
    wait_for(lambda: "reload refused, old policy stays" in d.log_text()[before:]
             and "sometimes" in d.log_text()[before:], "the refusal naming the field")
    assert "DONE" not in d.serial_text()                          # still spinning on 1
    assert virsh("domstate", d.name).stdout.strip() == "running"
    d.policy.write_text(CONST.format(2))
    r = d.reload()
    assert r.returncode == 0, r.stderr
    wait_for(lambda: "DONE" in d.serial_text(), "the guest to read the reloaded value")
    assert pvhguest.parse(d.serial_text())[(0, 0x40001234, 0)] == (2, 0)
    wait_for(lambda: "kvmgate: reloaded" in d.log_text()[before:], "the reload line")


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


def test_start_fails_when_the_qemu_user_cannot_write_the_audit(domain):
    """The audit file is opened as the QEMU user before QEMU starts: no silent run without
    audit."""
    d = domain()
    locked = d.dir / "root-only"
    locked.mkdir(mode=0o700)
    d.audit = locked / "audit.jsonl"
    d.define([(0xCE, 0, 0)], CONST.format(1))
    r = virsh("start", d.name, check=False)
    assert r.returncode != 0
    assert f"{d.audit}: Permission denied" in r.stderr and "QEMU is not started" in r.stderr
    assert "Traceback" not in d.log_text()
    assert d.serial_text() == ""                                  # the guest never ran


def test_start_fails_when_the_shim_cannot_be_mapped(domain, emulator):
    """A shim the QEMU user can read but not map (here: on a noexec mount; with AppArmor: a
    profile without `m`) passes a readability check, and ld.so would skip it silently and run
    the guest without a policy.  kvmgate-qemu maps it first, so QEMU is not started."""
    d = domain()
    mnt = d.dir / "noexec"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "noexec,size=16m,mode=0755", "tmpfs", str(mnt)],
                       check=False, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a noexec tmpfs here: {r.stderr.strip()}")
    try:
        shim = mnt / "shim.so"
        shutil.copy(d.shim, shim)
        shim.chmod(0o644)
        d.emulator = emulator.write(d.dir / "kvmgate-qemu-noexec", shim)
        d.define([(0xCE, 0, 0)], CONST.format(1))
        r = virsh("start", d.name, check=False)
        assert r.returncode != 0
        assert "cannot be loaded by uid" in r.stderr and "QEMU is not started" in r.stderr
        assert "cannot be preloaded" not in d.log_text()
        assert d.serial_text() == ""                              # the guest never ran
    finally:
        virsh("destroy", d.name, check=False)
        subprocess.run(["umount", str(mnt)], check=False)
