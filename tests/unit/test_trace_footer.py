"""A Parquet footer whose level histogram has the wrong size made pyarrow abort the whole
process (`terminate called after throwing an instance of 'parquet::ParquetException'`,
SIGABRT) when kvmgate asked for the column metadata: found by the slow trace fuzz (one flipped
byte).  kvmgate checks the footer's structure first (kvmgate.trace.pagecheck.check_footer) and
refuses the file with exit 2.  The commands run in a child process, so that an abort fails the
test instead of killing the test run."""
import subprocess
import sys
from pathlib import Path

import numpy as np

from kvmgate.trace import Trace
from kvmgate.trace.pagecheck import PageError, check_footer, read_footer

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "kvmgate" / "examples" / "deny-by-default.toml"
LIST_OF_0_I64, LIST_OF_2_I64 = 0x06, 0x26       # compact-protocol list headers


def damaged(tmp_path) -> Path:
    """A trace whose footer says a level-0 column has a 2-entry repetition level histogram."""
    path = tmp_path / "t.parquet"
    Trace.from_arrays(np.array([0x10, 0x11, 0x12] * 10, dtype=np.uint64),
                      np.array([False, True, False] * 10)).save(path)
    data = bytearray(path.read_bytes())
    foot = read_footer(path)
    start = len(data) - 8 - len(foot)
    check_footer(foot)                           # the undamaged file passes
    for i, b in enumerate(foot):
        if b != LIST_OF_0_I64:
            continue
        trial = bytearray(foot)
        trial[i] = LIST_OF_2_I64
        try:
            check_footer(bytes(trial))
        except PageError as e:
            if "repetition level histogram of 2 entries" in str(e):
                data[start + i] = LIST_OF_2_I64
                out = tmp_path / "damaged.parquet"
                out.write_bytes(bytes(data))
                return out
    raise AssertionError("no empty level histogram in the footer to damage")


def test_damaged_level_histogram_is_refused_without_aborting(tmp_path):
    bad = damaged(tmp_path)
    r = subprocess.run([sys.executable, "-m", "kvmgate", "trace", "replay", "--policy", str(POLICY),
                        str(bad)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "damaged Parquet footer" in r.stderr and "histogram" in r.stderr
    assert "Traceback" not in r.stderr and "terminate called" not in r.stderr
    for full in ([], ["--full-check"]):
        r = subprocess.run([sys.executable, "-m", "kvmgate", "trace", "replay", "--policy",
                            str(POLICY), *full, str(bad)], capture_output=True, text=True,
                           cwd=ROOT, timeout=120)
        assert r.returncode == 2 and "damaged Parquet footer" in r.stderr, r.stderr


def test_footer_checks_refuse_what_does_not_parse():
    for junk in (b"", b"\x19", b"\x15\x00", bytes(range(256))):
        try:
            check_footer(junk)
        except PageError:
            pass
        else:
            raise AssertionError(f"{junk[:8]!r} accepted")
