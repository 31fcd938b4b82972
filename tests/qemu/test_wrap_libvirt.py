"""libvirt for real: a domain whose <emulator> is kvmgate-qemu, started by libvirtd (QEMU as
the unprivileged QEMU user, environment cleared, seccomp sandbox): the guest sees the policy's
answers, the audit records appear, destroy/restart and `kvmgate reload` work; a shim the QEMU
user cannot read or a bad policy stop `virsh start` with the reason.

Skips without libvirt unless KVMGATE_REQUIRE_LIBVIRT=1.  libvirtd/virtlogd are started by hand
when not running (no systemd here) and stopped by pid at the end, never under another test
run (tests/qemu/libvirt_host.py)."""
from __future__ import annotations

import os
import uuid

import pytest

from kvmgate.wrap import pvhguest

from .libvirt_host import EFER, Domain, needs_libvirt, virsh, wait_for

pytestmark = needs_libvirt


@pytest.fixture
def world(emulator):
    d = Domain(f"kvmgate-test-{os.getpid()}-{uuid.uuid4().hex[:6]}", emulator)
    yield d
    d.cleanup()


def define(w, accesses, policy_text, wait=0):
    return w.define(accesses, policy_text, wait=wait)


def log_text(f) -> str:
    return f["log"].read_text(errors="replace") if f["log"].exists() else ""


def test_domain_under_policy_audit_destroy_restart_reload(world):
    f = define(world, [(0x40001234, 0, 0), (0x12345678, 0, 0)],
               '[policy]\ndefault = "allow"\n' + EFER +
               '[[rule]]\nmsr = 0x40001234\naccess = "read"\naction = "constant"\nlog = false\nvalue = 1\n'
               '[[rule]]\nmsr = 0x12345678\naccess = "read"\naction = "ignore"\nlog = true\n', wait=2)
    name = world.name
    before = len(log_text(f))
    virsh("start", name)
    wait_for(lambda: f["serial"].exists() and "W" in f["serial"].read_text(), "the guest to spin")
    wait_for(lambda: "active in VMM" in log_text(f)[before:], "the shim's line (via virtlogd)")
    virsh("destroy", name)                                      # destroy and start again
    before = len(log_text(f))
    f["serial"].unlink()
    virsh("start", name)
    wait_for(lambda: f["serial"].exists() and "W" in f["serial"].read_text(), "the guest to spin again")
    f["policy"].write_text(f["policy"].read_text().replace("value = 1", "value = 2"))
    r = world.reload()
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
        world.shim.chmod(0o600)                              # root's; the QEMU user cannot read it
    else:
        f["policy"].write_text('[policy]\ndefault = "sometimes"\n')
    r = virsh("start", world.name, check=False)
    assert r.returncode != 0
    assert needle in r.stderr or needle in log_text(f)
    assert "QEMU is not started" in r.stderr + log_text(f)
    assert not f["serial"].exists() or "R " not in f["serial"].read_text()   # the guest never ran
