"""Fuzzing the trace reader and the trace-cmd text importer (hypothesis).

Every input either succeeds with the right counts or is refused with the project's own error
(TraceFormatError / UserError); any other exception is an escape and fails the test.

Trace reader: arbitrary bytes, and structured mutations of a valid Parquet trace (cut at any
length, a byte flipped anywhere, random bytes after a valid magic, random bytes appended).
A mutated file that is accepted must count exactly what the original counts.  Text importer:
arbitrary bytes as a report file, and valid kvm_msr lines mixed with arbitrary text (every
valid line must come back as its event).

CI runs a fixed seed and a small budget; KVMGATE_SLOW=1 runs FUZZ_SLOW_EXAMPLES per input kind
(KVMGATE_FUZZ_EXAMPLES=N sets another budget).
The counts are printed in the test summary (SUMMARY_LINES).
"""
import io
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmgate.errors import UserError
from kvmgate.trace import (Trace, TraceFile, TraceFormatError, import_trace_cmd, import_trace_cmd_to,
                           replay, report_counts)
from kvmgate.trace.textimport import parse_line

SLOW = os.environ.get("KVMGATE_SLOW") == "1"
FUZZ_SLOW_EXAMPLES = 50_000
EXAMPLES = int(os.environ.get("KVMGATE_FUZZ_EXAMPLES", "0")) or (FUZZ_SLOW_EXAMPLES if SLOW else 100)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

pytestmark = pytest.mark.timeout(0 if SLOW else 300)     # the slow budget takes its time

STATS: dict[str, dict[str, int]] = {}


def _count(kind: str, outcome: str) -> None:
    d = STATS.setdefault(kind, {"inputs": 0, "accepted": 0, "refused": 0})
    d["inputs"] += 1
    d[outcome] += 1


class _Summary:
    """The lines the test summary prints (tests/conftest.py reads SUMMARY_LINES)."""

    def __iter__(self):
        if not STATS:
            return iter(())
        parts = [f"{k}: {v['inputs']} inputs ({v['accepted']} accepted with correct counts, "
                 f"{v['refused']} refused)" for k, v in sorted(STATS.items())]
        return iter(["fuzz (trace reader and importer, 0 escapes): " + "; ".join(parts)])


SUMMARY_LINES = _Summary()


def _decide(index, write, exception):
    return "deny" if (index + 2 * write + exception) % 3 == 0 else "allow"


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A valid trace (3 row groups, 2 hosts' worth of keys) and its counts."""
    d = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(1)
    n = 900
    t = Trace.from_arrays(rng.choice([0x10, 0x1B, 0x3A, 0xC0000080, 0x4B564DFF], n),
                          rng.random(n) < 0.3, rng.integers(0, 2**63, n), rng.random(n) < 0.1,
                          rng.integers(1, 4, n), np.arange(n) * 1000, host="fuzz-host")
    path = d / "orig.parquet"
    t.save(path, row_group_events=300)
    want = report_counts(replay(path, _decide))
    assert sum(want.values()) == n
    return path.read_bytes(), want, d


def _read(data: bytes, path, want, kind: str) -> None:
    path.write_bytes(data)
    try:
        fast = report_counts(replay(path, _decide))
        full = report_counts(replay(path, _decide, full=True))
        TraceFile(path).read()
    except TraceFormatError as e:
        assert str(e) and "\n" not in str(e)
        _count(kind, "refused")
        return
    # accepted: it must count exactly what the original counts (both ways)
    if want is not None:
        assert fast == want and full == want, (kind, len(data))
    else:
        assert fast == full
    _count(kind, "accepted")


@FUZZ
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes(original, data):
    _, _, d = original
    _read(data, d / "bytes.parquet", None, "trace bytes")


@FUZZ
@given(cut=st.integers(0, 1 << 30))
def test_cut(original, cut):
    orig, want, d = original
    _read(orig[:cut % (len(orig) + 1)], d / "cut.parquet", want, "trace cut")


@FUZZ
@given(pos=st.integers(0, 1 << 30), xor=st.integers(1, 255))
def test_flipped_byte(original, pos, xor):
    orig, want, d = original
    data = bytearray(orig)
    data[pos % len(data)] ^= xor
    _read(bytes(data), d / "flip.parquet", want, "trace flipped byte")


@FUZZ
@given(tail=st.binary(max_size=4096), end_magic=st.booleans())
def test_random_bytes_after_magic(original, tail, end_magic):
    _, _, d = original
    _read(b"PAR1" + tail + (b"PAR1" if end_magic else b""), d / "tail.parquet", None,
          "trace random after magic")


@FUZZ
@given(extra=st.binary(min_size=1, max_size=256), at_end=st.booleans())
def test_random_bytes_appended_or_prepended(original, extra, at_end):
    orig, want, d = original
    _read(orig + extra if at_end else extra + orig, d / "app.parquet", want, "trace extra bytes")


# ---- the trace-cmd text importer

comm = st.text(st.characters(whitelist_categories=("L", "N"), whitelist_characters="/ _."),
               min_size=1, max_size=20).filter(lambda c: c.strip() == c)
valid_line = st.builds(
    lambda comm, pid, cpu, sec, frac, write, index, value, gp:
        ((f"{comm}-{pid} [{cpu:03d}] {sec}.{frac:06d}: kvm_msr: msr_{'write' if write else 'read'} "
          f"{index:x} = {value:#x}{' (#GP)' if gp else ''}"),
         (sec * 10**9 + frac * 1000, pid, index, write, value, gp)),
    comm, st.integers(1, 2**31 - 1), st.integers(0, 999), st.integers(0, 10**9),
    st.integers(0, 999_999), st.booleans(), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1),
    st.booleans())
junk = st.text(max_size=200).map(lambda s: s.replace("\n", " ").replace("\r", " "))


@FUZZ
@given(items=st.lists(st.one_of(valid_line, junk), max_size=40))
def test_importer_valid_lines_among_junk(items):
    lines = [(it[0] if isinstance(it, tuple) else it) + "\n" for it in items]
    want = [it[1] for it in items if isinstance(it, tuple)]
    t = import_trace_cmd(lines)
    got = [e for e in t.events()]
    stats = t.meta["import"]
    assert stats["lines"] == len(lines)
    assert stats["events"] + stats["malformed"] + stats["other_lines"] + sum(stats["skipped_events"].values()) \
        == len(lines)
    # every valid line is an event, in order (junk lines never are, unless they are valid lines)
    junk_events = [parse_line(ln) for ln in lines if type(parse_line(ln)) is tuple]
    assert len(got) == len(junk_events) >= len(want)
    assert [tuple(e) for e in got] == [j[:6] for j in junk_events]
    it = iter(got)
    assert all(w in it for w in want)
    _count("importer lines", "accepted")


@FUZZ
@given(data=st.binary(max_size=4096))
def test_importer_arbitrary_bytes(tmp_path_factory, data):
    d = tmp_path_factory.getbasetemp()
    src, out = d / "report.txt", d / "imported.parquet"
    src.write_bytes(data)
    try:
        f = import_trace_cmd_to(src, out)
    except UserError:
        _count("importer bytes", "refused")
        return
    stats = f.meta["import"]
    text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="replace")
    assert stats["lines"] == len(text.readlines())          # as a text file splits: \n, \r, \r\n
    assert f.events == stats["events"] == len(f.read())
    _count("importer bytes", "accepted")
