"""`kvmgate-qemu`, libvirt's `<emulator>`, run the way libvirt runs it (without libvirtd):
`-name guest=NAME,...`, per-domain settings, QEMU exec'ed in place, audit from the detached
keeper, `kvmgate reload NAME`, and QEMU never started when something is missing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmgate.wrap import pvhguest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60
EFER = '[[rule]]\nmsr = "IA32_EFER"\naccess = "both"\naction = "allow"\nlog = false\n'


@pytest.fixture
def domain(tmp_path):
    """A domain named 'a,b' (libvirt doubles the comma): settings dir, run dir, environment."""
    domains, run_dir = tmp_path / "domains", tmp_path / "run"
    domains.mkdir()
    env = dict(os.environ, KVMGATE_DOMAINS=str(domains), KVMGATE_RUN_DIR=str(run_dir))
    return {"name": "a,b", "settings": domains / "a,b.toml", "run": run_dir, "env": env,
            "tmp": tmp_path}


def emulator(d, elf, vcpus=2, **kw):
    qemu = pvhguest.qemu_argv(elf, vcpus)
    argv = [sys.executable, "-m", "kvmgate.cli.qemu", "-name", "guest=a,,b,debug-threads=on",
            *qemu[1:]]
    return subprocess.Popen(argv, cwd=ROOT, env=d["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def finish(proc):
    try:
        return proc.communicate(timeout=TIMEOUT)   # EOF once QEMU and the keeper are gone
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_domain_runs_under_its_policy_with_audit(domain):
    t = domain["tmp"]
    pol = t / "p.toml"
    pol.write_text('[policy]\ndefault = "allow"\n' + EFER +
                   '[[rule]]\nmsr = 0xce\naccess = "read"\naction = "constant"\nvalue = 0x99\n')
    audit = t / "audit.jsonl"
    domain["settings"].write_text(f'policy = "{pol}"\naudit = "{audit}"\n')
    elf = pvhguest.build([(0xCE, 0, 0), (0x35, 0, 0)], t, vcpus=2)
    out, err = finish(emulator(domain, elf))
    res = pvhguest.parse(out)
    assert res["done"], err
    assert res[(0, 0xCE, 0)] == (0x99, 0) and res[(1, 0xCE, 0)] == (0x99, 0)
    assert "domain a,b: policy" in err and "active in VMM" in err
    recs = [json.loads(x) for x in audit.read_text().splitlines()]
    assert recs[0]["event"] == "active"                        # then the decisions
    assert sorted(r["vcpu"] for r in recs[1:] if r["msr"] == "0xce") == [0, 1]
    assert not (domain["run"] / "a,b.pid").exists()          # the keeper cleaned up


def test_reload_domain_while_it_runs(domain):
    t = domain["tmp"]
    pol = t / "p.toml"
    rule = ('[policy]\ndefault = "allow"\n' + EFER + '[[rule]]\nmsr = 0x40001234\naccess = "read"\n'
            'action = "constant"\nlog = false\nvalue = {}\n')
    pol.write_text(rule.format(1))
    domain["settings"].write_text(f'policy = "{pol}"\n')
    elf = pvhguest.build([(0x40001234, 0, 0)], t, vcpus=1, wait=2)
    proc = emulator(domain, elf)
    try:
        assert proc.stdout.readline().strip() == "W"           # spinning on the value 1
        pol.write_text(rule.format(2))
        r = subprocess.run([sys.executable, "-m", "kvmgate", "reload", "a,b"], cwd=ROOT,
                           env=domain["env"], check=False, capture_output=True, text=True,
                           timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
        out, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert pvhguest.parse(out)[(0, 0x40001234, 0)] == (2, 0)
    assert "kvmgate: reloaded" in err


@pytest.mark.parametrize("settings,needle", [
    (None, "no kvmgate settings"),
    ('policy = "{tmp}/missing.toml"\n', "not readable"),
    ('policy = "{tmp}/bad.toml"\n', "default"),
])
def test_nothing_runs_when_something_is_missing(domain, settings, needle):
    t = domain["tmp"]
    (t / "bad.toml").write_text('[policy]\ndefault = "sometimes"\n')
    if settings is not None:
        domain["settings"].write_text(settings.format(tmp=t))
    elf = pvhguest.build([(0xCE, 0, 0)], t, vcpus=1)
    proc = emulator(domain, elf)
    out, err = finish(proc)
    assert proc.returncode == 1
    assert out == ""                                           # the guest never ran
    assert "QEMU is not started" in err and needle in err


def test_probes_without_name_run_qemu_untouched(domain):
    r = subprocess.run([sys.executable, "-m", "kvmgate.cli.qemu", "-version"], cwd=ROOT,
                       env=domain["env"], check=False, capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert r.returncode == 0 and "QEMU emulator version" in r.stdout
