"""Pure tests of kvmgate.trace: text import, the Parquet trace format and its damage detection,
crash-safe writing (a writer really killed), replay over many files and hosts (in process and
on a Dask LocalCluster), ring-buffer pages."""
import base64
import json
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from kvmgate.errors import UserError
from kvmgate.msr.model import DEFAULT_ALLOW, DEFAULT_DENY, READ, WRITE, MsrFilter, MsrRange
from kvmgate.trace import (SCHEMA, Summary, Trace, TraceFile, TraceFormatError, TraceWriter, collect,
                           filter_decider, import_trace_cmd, import_trace_cmd_to, load_trace,
                           naive_counts, parse_line, replay, report_counts)
from kvmgate.bench.replay import bench_replay, sixteen_range_filter, synthetic_columns
from kvmgate.trace.pagecheck import PageError, check_column_chunk
from kvmgate.trace.schema import META_KEY, document_crc
from kvmgate.trace.sources import LOCAL_CLUSTER_OPTIONS
from kvmgate.trace.writing import MARKER
from kvmgate.trace.textimport import parse_lines
from kvmgate.trace.tracefs import EventLayout, TimeMerger, event_columns, parse_page

ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------- trace-cmd / ftrace text

REPORT = """\
cpus=2
version = 6
CPU 1 is empty
# tracer: nop
#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION

qemu-system-x86-1234  [001]  5678.901234: kvm_msr: msr_write c0000082 = 0xffffffff81a00000
qemu-system-x86-1234  [001]  5678.901240: kvm_exit: reason MSR_READ rip 0xffffffff81000000 info 0 0
qemu-system-x86-1234  [001]  5678.901241: kvm_msr: msr_read 4b564dff = 0x0 (#GP)
 CPU 0/KVM-1240 (   1234) [003] d..1. 5678.901299: kvm_msr:   msr_read 1b = 0xfee00900
         python3-6333    [000] .....   616.667971: kvm_msr: msr_read 10 = 0x174ca939747
kworker/0:1-events-77 [000] 700.123456789: kvm_msr: msr_write 6e0 = 0x1a2b3c (#GP)
qemu-system-x86-1234  [001]  5678.901300: kvm_entry: vcpu 0, rip 0xffffffff81000000
qemu-system-x86-1234  [001]  5678.901301: kvm_msr: msr_read zz = 0x1
\x00\x01 binary garbage \xff
qemu-system-x86-1234  [001]  5678.90
"""


def test_parse_line_variants():
    assert parse_line("qemu-system-x86-1234  [001]  5678.901234: kvm_msr: msr_write c0000082 "
                      "= 0xffffffff81a00000\n") == \
        (5678_901234000, 1234, 0xC0000082, True, 0xFFFFFFFF81A00000, False, -1)
    assert parse_line(" CPU 3/KVM-1240 (   1234) [003] d..1. 5678.901299: kvm_msr:   msr_read 1b "
                      "= 0xfee00900 (#GP)") == (5678_901299000, 1240, 0x1B, False, 0xFEE00900, True, 3)
    assert parse_line("x-1 [000] 1.000000001: kvm:kvm_msr: msr_read 0 = 0") == (1_000000001, 1, 0, False, 0, False, -1)
    assert parse_line("x-1 [000] 99999999999.5: kvm_msr: msr_read 10 = 0x1") == "malformed"   # past int64 ns
    assert parse_line("x-1 [000] 1.5: kvm_exit: reason 31") == "kvm_exit"
    assert parse_line("x-1 [000] 1.5: kvm_msr: msr_read 10 = 0x1ffffffffffffffff") == "malformed"
    assert parse_line("# tracer: nop") is None
    assert parse_line("") is None


def test_import_report_counts_everything():
    trace = import_trace_cmd(REPORT.splitlines(True))
    assert list(trace.events()) == [
        (5678_901234000, 1234, 0xC0000082, True, 0xFFFFFFFF81A00000, False),
        (5678_901241000, 1234, 0x4B564DFF, False, 0, True),
        (5678_901299000, 1240, 0x1B, False, 0xFEE00900, False),
        (616_667971000, 6333, 0x10, False, 0x174CA939747, False),
        (700_123456789, 77, 0x6E0, True, 0x1A2B3C, True)]
    assert trace.cols["vcpu"].tolist() == [-1, -1, 0, -1, -1]        # "CPU 0/KVM"
    imp = trace.meta["import"]
    assert imp["events"] == 5
    assert imp["skipped_events"] == {"kvm_exit": 1, "kvm_entry": 1}
    assert imp["malformed"] == 1 and "zz" in imp["malformed_examples"][0]
    assert imp["lines"] == REPORT.count("\n")
    assert imp["other_lines"] == imp["lines"] - 5 - 2 - 1


def test_import_from_file_streams_to_parquet(tmp_path):
    src = tmp_path / "report.txt"
    lines = [f"vcpu-{7 + i % 3}  [00{i % 2}]  {100 + i}.{i:06d}: kvm_msr: msr_{'write' if i % 4 == 0 else 'read'} "
             f"{0x10 + i % 5:x} = {hex(i * 3)}{' (#GP)' if i % 7 == 0 else ''}\n" for i in range(200)]
    src.write_text("".join(lines) + "junk\n")
    f = import_trace_cmd_to(src, tmp_path / "t.parquet", row_group_events=16)
    assert f.row_groups == 13 and f.events == 200
    assert f.meta["import"]["other_lines"] == 1 and f.meta["file"] == str(src)
    got = f.read()
    want = import_trace_cmd(src)
    assert list(got.events()) == list(want.events())
    assert got.events().__next__() == (100_000000000, 7, 0x10, True, 0, True)
    assert got.hosts == ["report"]                      # default host: the report's name


# ---------------------------------------------------------------- the Parquet trace format

def _random_columns(n, seed=0, pool=40):
    rng = np.random.default_rng(seed)
    idx_pool = rng.choice(np.array([0x10, 0x1B, 0x48, 0x6E0, 0x808, 0xC0000080, 0xC0000100,
                                    0x4B564DFF, 0xFFFFFFFF, 0] + list(range(0x300, 0x300 + pool))), pool)
    return {"index": idx_pool[rng.integers(0, pool, n)].astype(np.uint32),
            "write": rng.random(n) < 0.3, "value": rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False),
            "exception": rng.random(n) < 0.1, "pid": rng.integers(1, 6, n).astype(np.int32),
            "time_ns": np.sort(rng.integers(0, 2**62, n).astype(np.int64))}


def _assert_same(trace, cols):
    for k, v in cols.items():
        np.testing.assert_array_equal(getattr(trace, k), v, err_msg=k)


def _save(tmp_path, n=1000, seed=1, name="t.parquet", rg=128, host="h1", pool=40):
    cols = _random_columns(n, seed=seed, pool=pool)
    path = tmp_path / name
    Trace.from_arrays(**cols, host=host, meta={"source": "test"}).save(path, row_group_events=rg)
    return path, cols


def test_writer_reader_round_trip_many_row_groups(tmp_path):
    cols = _random_columns(1000, seed=1)
    path = tmp_path / "t.parquet"
    with TraceWriter(path, row_group_events=128, meta={"source": "test", "n": 1}, host="vm-a") as w:
        lo = 0
        for size in (1, 127, 300, 0, 5, 567):       # batches straddle row-group boundaries
            w.append(**{k: v[lo:lo + size] for k, v in cols.items()})
            lo += size
        w.meta["late"] = True
    f = TraceFile(path)
    assert not f.foreign and f.meta == {"source": "test", "n": 1, "late": True}
    assert (f.events, f.row_groups) == (1000, 8)
    assert [f.md.row_group(i).num_rows for i in range(8)] == [128] * 7 + [104]
    trace = f.read()
    _assert_same(trace, cols)
    assert trace.hosts == ["vm-a"] and load_trace(path).meta["late"] is True
    # what other tools see: the documented schema, dictionary-encoded, zstd, page checksums
    assert pq.read_schema(path).remove_metadata().equals(SCHEMA)
    col = f.md.row_group(0).column(0)
    assert col.compression == "ZSTD" and "RLE_DICTIONARY" in col.encodings
    assert META_KEY in f.md.metadata


def test_stored_summaries_equal_decoded_events(tmp_path):
    path, cols = _save(tmp_path, n=3000, seed=2, rg=500, pool=8)
    f = TraceFile(path)
    fast, full = f.summary(), f.summary(full=True)
    assert np.array_equal(fast.keys, full.keys) and np.array_equal(fast.count, full.count)
    assert fast.events == 3000 and fast.hosts == ["h1"]
    host, index, write, exc = fast.columns()
    pids, values = fast.pids_of(), fast.values_of()
    for k in range(len(fast)):
        sel = (cols["index"] == index[k]) & (cols["write"] == write[k]) & (cols["exception"] == exc[k])
        assert fast.count[k] == sel.sum()
        assert (fast.first_ns[k], fast.last_ns[k]) == (cols["time_ns"][sel].min(), cols["time_ns"][sel].max())
        assert set(pids[k]) == set(cols["pid"][sel].tolist())
        assert values[k] == tuple(sorted(set(cols["value"][sel].tolist()))[:4])


def test_empty_trace(tmp_path):
    Trace.from_arrays([], [], meta={"x": 1}).save(tmp_path / "e.parquet")
    f = TraceFile(tmp_path / "e.parquet")
    assert (f.events, f.row_groups, f.meta) == (0, 0, {"x": 1})
    rep = replay(tmp_path / "e.parquet", lambda *a: "allow")
    assert (rep.events, rep.totals, rep.rows) == (0, {}, [])
    assert "0 events" in rep.table()
    assert len(import_trace_cmd(["nothing here"])) == 0


def test_foreign_parquet_is_read_event_by_event(tmp_path):
    """A file written by another tool (no kvmgate metadata, plain columns) replays the same."""
    cols = _random_columns(2000, seed=3)
    t = pa.table({"index": cols["index"].astype(np.int64), "direction": np.where(cols["write"], "write", "read"),
                  "exception": cols["exception"], "time_ns": cols["time_ns"]})
    pq.write_table(t, tmp_path / "duck.parquet", row_group_size=700)
    f = TraceFile(tmp_path / "duck.parquet")
    assert f.foreign
    decide = lambda i, w, e: "deny" if (i + 2 * w + e) % 3 == 0 else "allow"  # noqa: E731
    rep = replay(tmp_path / "duck.parquet", decide)
    assert report_counts(rep) == naive_counts(cols["index"], cols["write"], cols["exception"], decide)
    assert rep.files[0].foreign and rep.files[0].hosts == ["duck"]
    bad = pa.table({"index": [1, 2], "direction": ["read", "sideways"]})
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(TraceFormatError, match="read/write"):
        replay(tmp_path / "bad.parquet", decide)
    pq.write_table(pa.table({"index": [-1], "direction": ["read"]}), tmp_path / "neg.parquet")
    with pytest.raises(TraceFormatError, match="index"):
        replay(tmp_path / "neg.parquet", decide)


# ---------------------------------------------------------------- damage

def _mutated(tmp_path, path, name, fn):
    data = bytearray(path.read_bytes())
    out = tmp_path / name
    out.write_bytes(bytes(fn(data)))
    return out


def _key_column_range(path, column="index", group=0):
    md = pq.ParquetFile(path).metadata
    cc = md.row_group(group).column(SCHEMA.names.index(column))
    start = cc.dictionary_page_offset if cc.has_dictionary_page else cc.data_page_offset
    return start, start + cc.total_compressed_size


@pytest.mark.parametrize("full", [False, True])
def test_cut_file_is_refused(tmp_path, full):
    path, _ = _save(tmp_path, n=5000, rg=1000)
    size = path.stat().st_size
    for cut in (size // 2, size - 1, 8, 4, 0):
        bad = _mutated(tmp_path, path, f"cut{cut}.parquet", lambda d: d[:cut])
        with pytest.raises(TraceFormatError) as e:
            replay(bad, lambda *a: "x", full=full)
        assert str(bad) in str(e.value)
        assert ("truncated" in str(e.value)) or ("not a Parquet" in str(e.value))


@pytest.mark.parametrize("column", ["index", "direction", "exception"])
def test_flipped_byte_in_a_key_column_is_refused(tmp_path, column):
    path, _ = _save(tmp_path, n=5000, rg=1000)
    lo, hi = _key_column_range(path, column, group=2)
    for off in (lo + 2, (lo + hi) // 2, hi - 1):
        bad = _mutated(tmp_path, path, "flip.parquet", lambda d: d.__setitem__(off, d[off] ^ 0x5A) or d)
        for full in (False, True):
            with pytest.raises(TraceFormatError, match="damaged|row group"):
                replay(bad, lambda *a: "x", full=full)


def test_random_bytes_after_magic_and_damaged_metadata_are_refused(tmp_path):
    path, _ = _save(tmp_path, n=3000, rg=1000)
    data = path.read_bytes()
    rng = np.random.default_rng(7)
    junk = tmp_path / "junk.parquet"
    for k in range(20):
        junk.write_bytes(b"PAR1" + rng.bytes(int(rng.integers(0, 5000))) + (b"PAR1" if k % 2 else b""))
        with pytest.raises(TraceFormatError):
            replay(junk, lambda *a: "x")
    # the kvmgate document: a changed count in it breaks its CRC
    doc = json.loads(pq.ParquetFile(path).metadata.metadata[META_KEY])
    t = pq.read_table(path)
    s0 = Summary.from_json(doc["summaries"][0], "x")
    s0.count[0] += 1
    doc["summaries"][0] = s0.to_json()
    pq.write_table(t.replace_schema_metadata({META_KEY: json.dumps(doc)}), tmp_path / "doc.parquet",
                   row_group_size=1000)
    with pytest.raises(TraceFormatError, match="checksum"):
        replay(tmp_path / "doc.parquet", lambda *a: "x")
    # a consistent document that disagrees with the events: only the full check can see it
    doc["crc"] = document_crc(doc)
    pq.write_table(t.replace_schema_metadata({META_KEY: json.dumps(doc)}), tmp_path / "doc2.parquet",
                   row_group_size=1000, write_page_checksum=True)
    with pytest.raises(TraceFormatError, match="disagree"):
        replay(tmp_path / "doc2.parquet", lambda *a: "x", full=True)
    assert data == path.read_bytes()


def test_not_a_trace(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"hello world, not a trace")
    with pytest.raises(TraceFormatError, match="not a Parquet"):
        TraceFile(p)
    with pytest.raises(TraceFormatError, match="directory"):
        TraceFile(tmp_path)
    with pytest.raises(TraceFormatError, match="regular"):
        TraceFile("/dev/zero")
    pq.write_table(pa.table({"a": [1]}), tmp_path / "other.parquet")
    with pytest.raises(TraceFormatError, match="no column"):
        TraceFile(tmp_path / "other.parquet")


def test_page_walker_checks_crc_and_counts(tmp_path):
    path, _ = _save(tmp_path, n=3000, rg=3000)
    lo, hi = _key_column_range(path)
    data = bytearray(path.read_bytes())
    assert check_column_chunk(bytes(data), lo, hi - lo) == 3000
    data[hi - 3] ^= 1
    with pytest.raises(PageError, match="checksum"):
        check_column_chunk(bytes(data), lo, hi - lo)
    with pytest.raises(PageError):
        check_column_chunk(bytes(data), lo + 1, hi - lo - 1)
    with pytest.raises(PageError, match="outside"):
        check_column_chunk(b"", 0, 10)


# ---------------------------------------------------------------- crash safety

WRITER_CHILD = """
import sys, numpy as np
from kvmgate.trace import TraceWriter
w = TraceWriter(sys.argv[1], crash_safe=True, row_group_events=1 << 20, flush_seconds=3600, host="vm")
for k in range(3):
    w.append(np.arange(100, dtype=np.uint32) + 0x100 * k, np.zeros(100, bool), time_ns=np.arange(100) + 1000 * k)
    w.flush()
    print("flushed", (k + 1) * 100, flush=True)
w.append(np.arange(50, dtype=np.uint32), np.ones(50, bool))      # never flushed
print("appended", flush=True)
sys.stdin.readline()
"""


def test_killed_writer_keeps_every_flushed_event(tmp_path):
    out = tmp_path / "rec.parquet"
    p = subprocess.Popen([sys.executable, "-c", WRITER_CHILD, str(out)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        lines = [p.stdout.readline().strip() for _ in range(4)]
        assert lines == ["flushed 100", "flushed 200", "flushed 300", "appended"], lines
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -signal.SIGKILL
    parts = tmp_path / "rec.parquet.parts"
    assert not out.exists() and (parts / MARKER).exists()
    got = collect([parts])
    assert got.events == 300 and len(got.files) == 3 and all(f.partial for f in got.files)
    assert got.partial and "unfinished recording" in got.partial[0] and "300 events" in got.partial[0]
    t = load_trace(parts)
    assert t.index.tolist() == [i + 0x100 * k for k in range(3) for i in range(100)]
    assert pq.read_table(parts).num_rows == 300            # other tools read the parts as they are


def test_crash_safe_writer_closes_into_one_file(tmp_path):
    cols = _random_columns(1000, seed=9)
    out = tmp_path / "r.parquet"
    with TraceWriter(out, crash_safe=True, row_group_events=300, flush_seconds=3600) as w:
        for lo in range(0, 1000, 70):
            w.append(**{k: v[lo:lo + 70] for k, v in cols.items()})
            if lo % 210 == 0:
                w.flush()
    assert not (tmp_path / "r.parquet.parts").exists()
    f = TraceFile(out)
    assert f.events == 1000 and all(f.md.row_group(i).num_rows <= 300 for i in range(f.row_groups))
    _assert_same(f.read(), cols)
    # a writer that fails before any event leaves nothing behind
    with pytest.raises(RuntimeError), TraceWriter(tmp_path / "none.parquet", crash_safe=True):
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == [out]


# ---------------------------------------------------------------- replay

filters = st.builds(
    lambda ranges, deny: MsrFilter(ranges, DEFAULT_DENY if deny and ranges else DEFAULT_ALLOW),
    st.lists(st.builds(lambda flags, base, bits: MsrRange.from_bits(flags, base, bits),
                       st.sampled_from([READ, WRITE, READ | WRITE]),
                       st.sampled_from([0, 0x10, 0x300, 0x310, 0x800, 0xC0000080, 0xFFFFFFF0]),
                       st.lists(st.booleans(), min_size=1, max_size=40)), max_size=16),
    st.booleans())


@settings(max_examples=40)
@given(flt=filters, n=st.integers(0, 400), seed=st.integers(0, 2**16), rg=st.integers(1, 64))
def test_replay_equals_naive_per_event_count(tmp_path_factory, flt, n, seed, rg):
    cols = _random_columns(n, seed=seed, pool=12)
    decide = filter_decider(flt)
    path = tmp_path_factory.mktemp("r") / "t.parquet"
    Trace.from_arrays(**cols).save(path, row_group_events=rg)
    want = naive_counts(cols["index"], cols["write"], cols["exception"], decide)
    for rep in (replay(path, decide), replay(path, decide, full=True), replay(Trace.from_arrays(**cols), decide)):
        assert report_counts(rep) == want
        assert rep.events == n == sum(rep.totals.values())


def _fleet(tmp_path, hosts=5, per_host=2):
    """hosts directories with per_host files each, every host its own MSR mix."""
    paths, cols_all = [], []
    for h in range(hosts):
        h_pool = 10 + h % 7
        d = tmp_path / f"host-{h}"
        d.mkdir()
        for k in range(per_host):
            path, cols = _save(d, n=400 + 37 * h + k, seed=100 * h + k, name=f"t{k}.parquet", rg=150,
                               host=f"host-{h}", pool=h_pool)
            cols_all.append((f"host-{h}", cols))
        paths.append(d)
    return paths, cols_all


def test_fleet_replay_totals_and_by_host(tmp_path):
    paths, cols_all = _fleet(tmp_path)
    decide = lambda i, w, e: "deny" if (i + w) % 4 == 0 else ("gp" if e else "allow")  # noqa: E731
    rep = replay(paths, decide, by_host=True)
    assert len(rep.files) == 10 and rep.events == sum(len(c["index"]) for _, c in cols_all)
    cat = {k: np.concatenate([c[k] for _, c in cols_all]) for k in cols_all[0][1]}
    flat = report_counts(rep)
    assert flat == naive_counts(cat["index"], cat["write"], cat["exception"], decide)
    for h in range(5):
        mine = [c for host, c in cols_all if host == f"host-{h}"]
        want = naive_counts(*(np.concatenate([c[k] for c in mine]) for k in ("index", "write", "exception")), decide)
        got = {(r.index, r.write, v): n for r in rep.rows if r.host == f"host-{h}" for v, n in r.verdicts.items()}
        assert got == want
        assert rep.by_host[f"host-{h}"] == {v: sum(n for (_, _, vv), n in want.items() if vv == v)
                                            for v in {k[2] for k in want}}
    merged = replay(paths, decide)
    assert report_counts(merged) == flat and all(r.host is None for r in merged.rows)
    assert merged.decide_calls == len({(i, w, e) for i, w, e in zip(cat["index"].tolist(), cat["write"].tolist(),
                                                                    cat["exception"].tolist())})


def test_fleet_on_a_dask_local_cluster_equals_in_process(tmp_path):
    distributed = pytest.importorskip("distributed")
    paths, _ = _fleet(tmp_path, hosts=50, per_host=1)            # 50 hosts' directories
    decide = lambda i, w, e: "deny" if i % 3 == 0 else "allow"  # noqa: E731
    here = replay(paths, decide, by_host=True)
    with distributed.LocalCluster(n_workers=3, **LOCAL_CLUSTER_OPTIONS) as cluster:
        there = replay(paths, decide, by_host=True, dask=cluster.scheduler_address)
        assert len(cluster.scheduler.workers) == 3
    local = replay(paths, decide, by_host=True, dask="local:2")
    for rep in (there, local):
        assert [r.to_dict() for r in rep.rows] == [r.to_dict() for r in here.rows]
        assert rep.totals == here.totals and rep.by_host == here.by_host
        assert [f.to_dict() for f in rep.files] == [f.to_dict() for f in here.files]


def test_dask_local_replay_does_not_collide_on_port_8787(tmp_path):
    """Two `--dask local:N` replays at once (or one beside any program on 8787): the local
    cluster's HTTP server takes a free port, so distributed has nothing to warn about."""
    pytest.importorskip("distributed")
    import socket
    import warnings
    paths, _ = _fleet(tmp_path, hosts=2, per_host=1)
    decide = lambda i, w, e: "allow"  # noqa: E731
    holder = socket.socket()
    try:
        holder.bind(("", 8787))
        holder.listen()
    except OSError:                     # already held (e.g. by a second copy of the suite)
        pass
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rep = replay(paths, decide, by_host=True, dask="local:1")
    finally:
        holder.close()
    assert rep.totals == replay(paths, decide, by_host=True).totals
    assert [str(w.message) for w in caught if "8787" in str(w.message)] == []


def test_duckdb_reads_the_files_and_counts_the_same(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    paths, cols_all = _fleet(tmp_path, hosts=3, per_host=2)
    rows = duckdb.sql(f"SELECT host, index, direction, exception, count(*) FROM "
                      f"read_parquet('{tmp_path}/*/*.parquet') GROUP BY ALL").fetchall()
    got = {(h, i, d == "write", e): n for h, i, d, e, n in rows}
    s = collect(paths).summary
    host, index, write, exc = (a.tolist() for a in s.columns())
    want = {(s.hosts[host[k]], index[k], write[k], exc[k]): int(s.count[k]) for k in range(len(s))}
    assert got == want


def test_replay_streams_many_row_groups_and_asks_once_per_key(tmp_path):
    cols = _random_columns(5000, seed=5, pool=20)
    path = tmp_path / "t.parquet"
    with TraceWriter(path, row_group_events=333) as w:
        for lo in range(0, 5000, 1000):
            w.append(**{k: v[lo:lo + 1000] for k, v in cols.items()})
    calls = []

    def decide(i, w, e):
        calls.append((i, w, e))
        return "deny" if (i + w) % 3 == 0 else "allow"

    rep = replay(path, decide)
    assert rep.row_groups == 16
    assert len(calls) == len(set(calls)) == rep.distinct_keys      # once per key, across row groups
    assert report_counts(rep) == naive_counts(cols["index"], cols["write"], cols["exception"], decide)


def test_report_rows_table_and_json():
    t = Trace.from_arrays(index=[0x10, 0x10, 0x10, 0xC0000080, 0x10],
                          write=[False, False, True, True, False],
                          exception=[False, True, False, True, False],
                          pid=[7, 8, 7, 9, 7], time_ns=[5, 6, 7, 8, 9_000_000_000])
    rep = replay(t, lambda i, w, e: "deny" if e else "allow")
    r = rep.row(0x10, False)
    assert (r.events, r.verdicts, r.gp, r.first_ns, r.last_ns, r.pids) == \
        (3, {"allow": 2, "deny": 1}, 1, 5, 9_000_000_000, (7, 8))
    assert r.verdict() == "mixed" and rep.row(0x10, True).verdict() == "allow"
    assert rep.totals == {"allow": 3, "deny": 2}
    assert [(x.index, x.write) for x in rep.rows] == [(0x10, False), (0x10, True), (0xC0000080, True)]
    text = rep.table()
    assert "0xc0000080" in text and "DENY" in text and "5 events" in text
    d = json.loads(rep.to_json())
    assert d["totals"] == {"allow": 3, "deny": 2} and d["rows"][0]["index"] == "0x10"
    assert rep.table(limit=1).rstrip().endswith("2 more rows")


def test_summary_json_round_trip_and_checks():
    s = Trace.from_arrays(**_random_columns(500, seed=11)).summary()
    d = s.to_json()
    back = Summary.from_json(json.loads(json.dumps(d)), "x")
    assert np.array_equal(back.keys, s.keys) and back.values_of() == s.values_of()
    def enc(a, dtype):
        return base64.b64encode(np.asarray(a, dtype).tobytes()).decode()
    for field, val in (("count", enc(np.zeros(len(s)), "<i8")), ("keys", enc(s.keys[::-1], "<u8")),
                       ("keys", enc(s.keys | np.uint64(1 << 34), "<u8")), ("keys", d["keys"][:-4]),
                       ("pid_row", enc(np.full(len(s.pid), len(s)), "<i8")), ("value", "not base64!"),
                       ("hosts", [1]), ("hosts", ["b", "a"]), ("first_ns", enc(s.last_ns + 1, "<i8")),
                       ("value", 5)):
        with pytest.raises(TraceFormatError):
            Summary.from_json(dict(d, **{field: val}), "x")
    with pytest.raises(TraceFormatError):
        Summary.from_json([], "x")


def test_bench_smoke():
    res = bench_replay(30_000, rounds=1, out=None)
    assert res["events"] == 30_000 and sum(res["totals"].values()) == 30_000
    assert set(res["median_s"]) >= {"kvmgate", "kvmgate-full"}


def test_synthetic_trace_is_skewed():
    cols = synthetic_columns(100_000)
    idx, counts = np.unique(cols["index"], return_counts=True)
    assert 200 <= idx.size <= 400
    assert np.sort(counts)[-6:].sum() > 0.85 * 100_000          # a handful dominates
    assert (~cols["write"]).mean() > 0.7                          # mostly reads
    sixteen_range_filter().validate()

# ---------------------------------------------------------------- ring-buffer pages

FORMAT = """name: kvm_msr
ID: 99
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned write;\toffset:8;\tsize:4;\tsigned:0;
\tfield:u32 ecx;\toffset:12;\tsize:4;\tsigned:0;
\tfield:u64 data;\toffset:16;\tsize:8;\tsigned:0;
\tfield:u8 exception;\toffset:24;\tsize:1;\tsigned:0;

print fmt: "msr_%s %x = 0x%llx%s", REC->write ? "write" : "read", REC->ecx, REC->data, REC->exception ? " (#GP)" : ""
"""
LAYOUT = EventLayout(FORMAT)


def _rec(pid, write, ecx, data, exc, etype=99):
    return struct.pack("<HBBiIIQB7x", etype, 0, 0, pid, write, ecx, data, exc)


def _hdr(tl, delta):
    return struct.pack("<I", tl | delta << 5)


def _page(body, ts0, flags=0, size=4096):
    return (struct.pack("<QQ", ts0, len(body) | flags) + body).ljust(size, b"\0")


def test_event_layout():
    assert LAYOUT.id == 99 and LAYOUT.size == 25
    assert LAYOUT.fields["data"] == (16, 8, False) and LAYOUT.fields["common_pid"] == (4, 4, True)


def test_parse_page_uniform_fast_path():
    body = b"".join(_hdr(8, 10 * k + 1) + _rec(100 + k, k & 1, 0x10 + k, 2**63 + k, k % 3 == 0)
                    for k in range(100))
    recs, ts, missed = parse_page(_page(body, 1000, flags=1 << 31), LAYOUT)
    cols = event_columns(recs, ts, LAYOUT)
    assert missed and len(recs) == 100
    assert cols["time_ns"].tolist() == np.cumsum([1000] + [10 * k + 1 for k in range(100)])[1:].tolist()
    assert cols["index"].tolist() == [0x10 + k for k in range(100)]
    assert cols["value"].tolist() == [2**63 + k for k in range(100)]
    assert cols["write"].tolist() == [bool(k & 1) for k in range(100)]
    assert cols["exception"].tolist() == [k % 3 == 0 for k in range(100)]
    assert cols["pid"].tolist() == [100 + k for k in range(100)]


def test_parse_page_walks_extends_padding_and_long_records():
    body = b"".join([
        _hdr(8, 5) + _rec(1, 0, 0x10, 11, 0),                                # t = 1005
        _hdr(30, 3) + struct.pack("<I", 2),                                  # + (2 << 27) + 3
        _hdr(8, 7) + _rec(1, 1, 0x6E0, 22, 0),                               # t = 1015 + 2<<27
        _hdr(29, 4) + struct.pack("<I", 32) + b"\xee" * 28,                  # discarded: +4
        _hdr(0, 6) + struct.pack("<I", 36) + _rec(2, 0, 0x1B, 33, 1)[:32],   # long form: +6
        _hdr(8, 1) + _rec(3, 0, 0x99, 44, 0, etype=5),                       # another event type
        _hdr(8, 1) + _rec(4, 1, 0xC0000080, 55, 1),
    ])
    page = _page(body + _hdr(29, 0), 1000)
    recs, ts, missed = parse_page(page, LAYOUT)
    cols = event_columns(recs, ts, LAYOUT)
    big = 2 << 27
    assert not missed
    assert cols["time_ns"].tolist() == [1005, 1015 + big, 1025 + big, 1027 + big]
    assert cols["index"].tolist() == [0x10, 0x6E0, 0x1B, 0xC0000080]
    assert cols["value"].tolist() == [11, 22, 33, 55]
    assert cols["pid"].tolist() == [1, 1, 2, 4]
    assert cols["exception"].tolist() == [False, False, True, True]


def test_parse_empty_page():
    recs, ts, missed = parse_page(_page(b"", 5), LAYOUT)
    assert len(recs) == 0 and len(ts) == 0


def test_merger_orders_across_rounds():
    def cols(ts):
        n = len(ts)
        return {"index": np.arange(n, dtype=np.uint32), "time_ns": np.array(ts, np.uint64)}
    m = TimeMerger()
    m.push(cols([30, 10, 50]))
    assert m.pop(watermark=35)["time_ns"].tolist() == [10, 30]
    m.push(cols([40, 20]))              # 20 arrived late: still emitted (it is below nothing held)
    assert m.pop(watermark=45)["time_ns"].tolist() == [20, 40]
    m.push(None)
    assert m.pop(None)["time_ns"].tolist() == [50]
    assert m.pop(None) is None


def test_parse_lines_helper():
    events, stats = parse_lines(["a-1 [000] 1.0: kvm_msr: msr_read 10 = 0x5", "nonsense"])
    assert events == [(1_000000000, 1, 0x10, False, 5, False, -1)] and stats.other_lines == 1


def test_unreachable_dask_scheduler_is_a_user_error(tmp_path, monkeypatch):
    pytest.importorskip("distributed")
    from kvmgate.trace import sources
    monkeypatch.setattr(sources, "DASK_CONNECT_TIMEOUT", 1.0)    # port 1 refuses at once
    path, _ = _save(tmp_path, n=10)
    with pytest.raises(UserError, match="cannot reach the Dask scheduler"):
        replay(path, lambda *a: "x", dask="tcp://127.0.0.1:1")
    with pytest.raises(UserError, match="--dask"):
        replay(path, lambda *a: "x", dask="local:many")



def test_damaged_page_header_outside_the_checksums_is_refused(tmp_path):
    """Regression (found by the slow fuzz): page headers are not under the page checksums; this
    flipped byte (a page header of the host column, with pyarrow 26) decoded to dictionary
    indices out of range and escaped as ArrowIndexError."""
    rng = np.random.default_rng(1)
    n = 900
    Trace.from_arrays(rng.choice([0x10, 0x1B, 0x3A, 0xC0000080, 0x4B564DFF], n),
                      rng.random(n) < 0.3, rng.integers(0, 2**63, n), rng.random(n) < 0.1,
                      rng.integers(1, 4, n), np.arange(n) * 1000, host="fuzz-host"
                      ).save(tmp_path / "o.parquet", row_group_events=300)
    decide = lambda i, w, e: "deny" if (i + 2 * w + e) % 3 == 0 else "allow"  # noqa: E731
    want = report_counts(replay(tmp_path / "o.parquet", decide))
    data = bytearray((tmp_path / "o.parquet").read_bytes())
    data[4050 % len(data)] ^= 7
    (tmp_path / "m.parquet").write_bytes(bytes(data))
    for full in (False, True):
        try:
            assert report_counts(replay(tmp_path / "m.parquet", decide, full=full)) == want
        except TraceFormatError as e:
            assert "damaged" in str(e)
