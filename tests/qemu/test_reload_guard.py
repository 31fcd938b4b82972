"""`kvmgate reload DOMAIN` signals only the domain's kvmgate-qemu keeper: the pidfile is written
by QEMU's user, so a pid in it that names another process is refused and not signalled."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
