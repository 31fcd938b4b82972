"""A trace recorded from a running QEMU VM (`kvmgate trace record --pid QEMU_PID`) is a Parquet
file that DuckDB and pandas read without kvmgate, and `trace replay` counts the same accesses
per MSR and direction as they do (docs/kvm-msr.md; README "Trace files")."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kvmgate.wrap import pvhguest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120

# Counted per (MSR, direction) by a process that never imports kvmgate (checked at the end).
READER = r"""
import json, sys
import duckdb, pandas
path = sys.argv[1]
con = duckdb.connect()
duck = {f"{i:#x}/{d}": n for i, d, n in con.execute(
    "SELECT index, direction, count(*) FROM read_parquet(?) GROUP BY ALL", [path]).fetchall()}
df = pandas.read_parquet(path, columns=["index", "direction"])
pand = {f"{int(i):#x}/{d}": int(n) for (i, d), n in df.groupby(["index", "direction"], observed=True).size().items()}
assert not any(m == "kvmgate" or m.startswith("kvmgate.") for m in sys.modules)
print(json.dumps({"duckdb": duck, "pandas": pand}))
"""


def test_qemu_trace_reads_in_duckdb_and_pandas_with_replays_counts(tmp_path):
    elf = pvhguest.build([(0x10, 0, 0), (0x1B, 0, 0)], tmp_path, vcpus=2, loops=200000)
    qemu = subprocess.Popen(pvhguest.qemu_argv(elf, 2), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    out = tmp_path / "qemu.parquet"
    try:
        rec = subprocess.run([sys.executable, "-m", "kvmgate", "trace", "record", "--pid",
                              str(qemu.pid), "--duration", "1", "--out", str(out)],
                             capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT)
    finally:
        qemu.kill()
        qemu.wait()
    assert rec.returncode == 0, rec.stderr
    pol = tmp_path / "p.toml"
    pol.write_text('[policy]\ndefault = "allow"\n')
    rep = subprocess.run([sys.executable, "-m", "kvmgate", "trace", "replay", "--policy", str(pol),
                          "--all", "--limit", "0", "--json", str(out)], capture_output=True,
                         text=True, cwd=ROOT, timeout=TIMEOUT)
    assert rep.returncode == 0, rep.stderr
    replay = {f"{int(r['index'], 16):#x}/{r['access']}": r["events"] for r in json.loads(rep.stdout)["rows"]}
    assert sum(replay.values()) > 0, rep.stdout
    seen = subprocess.run([sys.executable, "-c", READER, str(out)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=TIMEOUT)
    assert seen.returncode == 0, seen.stderr
    got = json.loads(seen.stdout)
    assert got["duckdb"] == got["pandas"] == replay
