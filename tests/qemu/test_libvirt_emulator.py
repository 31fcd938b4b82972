"""kvmgate-qemu and `kvmgate reload` without libvirtd: a command line that would run a guest
but names no domain is refused (only libvirt's probes run without a policy); `kvmgate reload
DOMAIN` signals only the domain's kvmgate-qemu keeper (the pidfile is written by QEMU's user,
so a pid in it that names another process is refused and not signalled)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kvmgate.wrap import pvhguest

ROOT = Path(__file__).resolve().parents[2]


def reload(tmp_path, pid_text: str) -> subprocess.CompletedProcess:
    domains, run_dir = tmp_path / "domains", tmp_path / "run"
    domains.mkdir(exist_ok=True)
    run_dir.mkdir(exist_ok=True)
    (tmp_path / "p.toml").write_text('[policy]\ndefault = "allow"\n')
    (domains / "d.toml").write_text(f'policy = "{tmp_path / "p.toml"}"\n')
    (run_dir / "d.pid").write_text(pid_text)
    return subprocess.run([sys.executable, "-m", "kvmgate", "reload", "d"], cwd=ROOT,
                          env=dict(os.environ, KVMGATE_DOMAINS=str(domains), KVMGATE_RUN_DIR=str(run_dir)),
                          check=False, capture_output=True, text=True, timeout=60)


def test_a_pid_that_is_not_a_keeper_is_not_signalled(tmp_path):
    victim = subprocess.Popen(["sleep", "600"])                # SIGHUP would end it
    try:
        r = reload(tmp_path, f"{victim.pid}\n")
        assert r.returncode == 2
        assert "not a kvmgate-qemu process" in r.stderr and "d.pid" in r.stderr
        assert "Traceback" not in r.stderr
        assert victim.poll() is None                           # still running: never signalled
    finally:
        victim.kill()
        victim.wait()


def test_a_pidfile_naming_no_process_is_refused(tmp_path):
    for text in ("0\n", "-1\n"):
        r = reload(tmp_path, text)
        assert r.returncode == 2 and "is not a process" in r.stderr, r.stderr


def test_a_guest_without_a_domain_name_is_not_started(tmp_path):
    elf = pvhguest.build([(0xCE, 0, 0)], tmp_path, vcpus=1)
    argv = pvhguest.qemu_argv(elf, 1)
    assert "-name" not in argv
    r = subprocess.run([sys.executable, "-m", "kvmgate.cli.qemu", *argv[1:]], cwd=ROOT,
                       env=dict(os.environ, KVMGATE_DOMAINS=str(tmp_path)), check=False,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "no -name guest=NAME" in r.stderr and "QEMU is not started" in r.stderr
    assert r.stdout == ""                                      # the guest never ran


def test_libvirt_probe_runs_qemu_untouched(tmp_path):
    """libvirt's probe: `-machine none` with QMP; QEMU answers and quits."""
    r = subprocess.run([sys.executable, "-m", "kvmgate.cli.qemu", "-machine", "none,accel=kvm:tcg",
                        "-display", "none", "-nodefaults", "-qmp", "stdio"], cwd=ROOT,
                       env=dict(os.environ, KVMGATE_DOMAINS=str(tmp_path)), check=False,
                       input='{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n',
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert '"QMP"' in r.stdout and '"return": {}' in r.stdout
