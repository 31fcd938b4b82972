"""Pure tests of kvmgate.trace: text import, the .kvmtrace format, ring-buffer pages, replay."""
import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvmgate.msr.model import DEFAULT_ALLOW, DEFAULT_DENY, READ, WRITE, MsrFilter, MsrRange
from kvmgate.trace import (Trace, TraceFormatError, TraceReader, TraceWriter, filter_decider,
                           import_trace_cmd, import_trace_cmd_to, naive_counts, parse_line, replay,
                           report_counts)
from kvmgate.trace.bench import bench_replay, sixteen_range_filter, synthetic_columns
from kvmgate.trace.textimport import parse_lines
from kvmgate.trace.tracefs import EventLayout, _Merger, _columns, parse_page

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
        (5678_901234000, 1234, 0xC0000082, True, 0xFFFFFFFF81A00000, False)
    assert parse_line(" CPU 0/KVM-1240 (   1234) [003] d..1. 5678.901299: kvm_msr:   msr_read 1b "
                      "= 0xfee00900 (#GP)") == (5678_901299000, 1240, 0x1B, False, 0xFEE00900, True)
    assert parse_line("x-1 [000] 1.000000001: kvm:kvm_msr: msr_read 0 = 0") == (1_000000001, 1, 0, False, 0, False)
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
    imp = trace.meta["import"]
    assert imp["events"] == 5
    assert imp["skipped_events"] == {"kvm_exit": 1, "kvm_entry": 1}
    assert imp["malformed"] == 1 and "zz" in imp["malformed_examples"][0]
    assert imp["lines"] == REPORT.count("\n")
    assert imp["other_lines"] == imp["lines"] - 5 - 2 - 1


def test_import_from_file_streams_to_kvmtrace(tmp_path):
    src = tmp_path / "report.txt"
    lines = [f"vcpu-{7 + i % 3}  [00{i % 2}]  {100 + i}.{i:06d}: kvm_msr: msr_{'write' if i % 4 == 0 else 'read'} "
             f"{0x10 + i % 5:x} = {hex(i * 3)}{' (#GP)' if i % 7 == 0 else ''}\n" for i in range(200)]
    src.write_text("".join(lines) + "junk\n")
    with import_trace_cmd_to(src, tmp_path / "t.kvmtrace", chunk_events=16) as r:
        assert r.chunk_count == 13 and len(r) == 200
        assert r.meta["import"]["other_lines"] == 1 and r.meta["file"] == str(src)
        got = r.read()
    want = import_trace_cmd(src)
    assert list(got.events()) == list(want.events())
    assert got.events().__next__() == (100_000000000, 7, 0x10, True, 0, True)


# ---------------------------------------------------------------- the .kvmtrace format

def _random_columns(n, seed=0, pool=40):
    rng = np.random.default_rng(seed)
    idx_pool = rng.choice(np.array([0x10, 0x1B, 0x48, 0x6E0, 0x808, 0xC0000080, 0xC0000100,
                                    0x4B564DFF, 0xFFFFFFFF, 0] + list(range(0x300, 0x300 + pool))), pool)
    return {"index": idx_pool[rng.integers(0, pool, n)].astype(np.uint32),
            "write": rng.random(n) < 0.3, "value": rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False),
            "exception": rng.random(n) < 0.1, "pid": rng.integers(1, 6, n).astype(np.int32),
            "time_ns": np.sort(rng.integers(0, 2**63, n).astype(np.uint64))}


def _assert_same(trace, cols):
    for k, v in cols.items():
        np.testing.assert_array_equal(getattr(trace, k), v, err_msg=k)


def test_writer_reader_round_trip_many_chunks(tmp_path):
    cols = _random_columns(1000, seed=1)
    path = tmp_path / "t.kvmtrace"
    with TraceWriter(path, chunk_events=128, meta={"source": "test", "n": 1}) as w:
        lo = 0
        for size in (1, 127, 300, 0, 5, 567):       # batches straddle chunk boundaries
            w.append(**{k: v[lo:lo + size] for k, v in cols.items()})
            lo += size
        w.meta["late"] = True
    with TraceReader(path) as r:
        assert not r.recovered
        assert r.meta == {"source": "test", "n": 1, "late": True}
        assert len(r) == 1000 and r.chunk_count == 8
        sizes = [len(c) for c in r.iter_chunks()]
        assert sizes == [128] * 7 + [104]
        trace = r.read()
    _assert_same(trace, cols)
    assert Trace.load(path).meta["late"] is True


def test_chunk_dictionary_and_statistics():
    cols = _random_columns(500, seed=2, pool=8)
    trace = Trace.from_arrays(**cols, chunk_events=200)
    for c in trace.iter_chunks():
        assert c.codes.dtype == np.uint16 and c.nkeys <= 8 * 4
        keys = c.keys64()
        assert np.all(np.diff(keys.astype(np.float64)) > 0)          # sorted, distinct
        for j in range(c.nkeys):
            sel = c.codes == j
            assert c.key_count[j] == sel.sum()
            assert c.key_first_ns[j] == c.time_ns[sel].min() and c.key_last_ns[j] == c.time_ns[sel].max()
            assert set(c.pair_pid[c.pair_key == j].tolist()) == set(c.pid[sel].tolist())
    _assert_same(trace, cols)


def test_u32_codes_past_65536_keys(tmp_path):
    n = 70_000
    trace = Trace.from_arrays(np.arange(n, dtype=np.uint32), np.zeros(n, bool), chunk_events=n)
    assert trace.chunks[0].codes.dtype == np.uint32
    trace.save(tmp_path / "big.kvmtrace")
    back = Trace.load(tmp_path / "big.kvmtrace")
    np.testing.assert_array_equal(back.index, np.arange(n))
    rep = replay(back, lambda i, w, e: "low" if i < 1000 else "high")
    assert rep.totals == {"low": 1000, "high": n - 1000} and rep.decide_calls == n


def test_recover_without_footer(tmp_path):
    cols = _random_columns(300, seed=3)
    path = tmp_path / "t.kvmtrace"
    Trace.from_arrays(**cols, chunk_events=100).save(path)
    data = path.read_bytes()
    with TraceReader(path) as r:
        offsets = [h["offset"] for h in r._chunk_headers]
    cut = tmp_path / "cut.kvmtrace"
    cut.write_bytes(data[:offsets[2] + 100])                 # footer gone, third chunk partial
    with TraceReader(cut) as r:
        assert r.recovered and r.chunk_count == 2 and len(r) == 200
        _assert_same(r.read(), {k: v[:200] for k, v in cols.items()})


def test_not_a_trace(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"hello world, not a trace")
    with pytest.raises(TraceFormatError):
        TraceReader(p)


def test_replay_detects_corrupt_codes(tmp_path):
    path = tmp_path / "t.kvmtrace"
    Trace.from_arrays(**_random_columns(100, seed=4, pool=3), chunk_events=100).save(path)
    with TraceReader(path) as r:
        h = r._chunk_headers[0]
        dtype, rel, count = h["columns"]["codes"]
        off = h["data"] + rel
    raw = bytearray(path.read_bytes())
    raw[off:off + 2] = struct.pack("<H", 0xFFFF)
    path.write_bytes(bytes(raw))
    with TraceReader(path) as r, pytest.raises(TraceFormatError):
        replay(r, lambda *a: "x")


# ---------------------------------------------------------------- replay

filters = st.builds(
    lambda ranges, deny: MsrFilter(ranges, DEFAULT_DENY if deny and ranges else DEFAULT_ALLOW),
    st.lists(st.builds(lambda flags, base, bits: MsrRange.from_bits(flags, base, bits),
                       st.sampled_from([READ, WRITE, READ | WRITE]),
                       st.sampled_from([0, 0x10, 0x300, 0x310, 0x800, 0xC0000080, 0xFFFFFFF0]),
                       st.lists(st.booleans(), min_size=1, max_size=40)), max_size=16),
    st.booleans())


@settings(max_examples=60)
@given(flt=filters, n=st.integers(0, 400), seed=st.integers(0, 2**16), chunk=st.integers(1, 64))
def test_replay_equals_naive_per_event_count(flt, n, seed, chunk):
    cols = _random_columns(n, seed=seed, pool=12)
    decide = filter_decider(flt)
    rep = replay(Trace.from_arrays(**cols, chunk_events=chunk), decide)
    assert report_counts(rep) == naive_counts(cols["index"], cols["write"], cols["exception"], decide)
    assert rep.events == n == sum(rep.totals.values())
    expected = {}
    for i, w in zip(cols["index"].tolist(), cols["write"].tolist()):
        v = "allow" if flt.allows(i, WRITE if w else READ) else "deny"
        expected[v] = expected.get(v, 0) + 1
    assert rep.totals == expected


def test_replay_streams_from_file_with_small_chunks(tmp_path):
    cols = _random_columns(5000, seed=5, pool=20)
    path = tmp_path / "t.kvmtrace"
    with TraceWriter(path, chunk_events=333) as w:
        for lo in range(0, 5000, 1000):
            w.append(**{k: v[lo:lo + 1000] for k, v in cols.items()})
    calls = []

    def decide(i, w, e):
        calls.append((i, w, e))
        return "deny" if (i + w) % 3 == 0 else "allow"

    seen = []
    with TraceReader(path) as r:
        chunks = r.iter_chunks()
        first = next(chunks)                                  # lazy: one chunk at a time
        assert len(first) == 333
        rep = replay(r, decide, progress=lambda ev, s: seen.append(ev))
    assert seen == [min(5000, 333 * k) for k in range(1, 17)]
    assert rep.chunks == 16
    assert len(calls) == len(set(calls)) == rep.distinct_keys      # once per key, across chunks
    assert report_counts(rep) == naive_counts(cols["index"], cols["write"], cols["exception"], decide)


def test_report_rows_table_and_json():
    t = Trace.from_arrays(index=[0x10, 0x10, 0x10, 0xC0000080, 0x10],
                          write=[False, False, True, True, False],
                          exception=[False, True, False, True, False],
                          pid=[7, 8, 7, 9, 7], time_ns=[5, 6, 7, 8, 9_000_000_000], chunk_events=2)
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


def test_empty_trace_replays(tmp_path):
    rep = replay(Trace(), lambda *a: "allow")
    assert (rep.events, rep.totals, rep.rows) == (0, {}, [])
    assert "0 events" in rep.table()
    Trace(meta={"x": 1}).save(tmp_path / "e.kvmtrace")
    with TraceReader(tmp_path / "e.kvmtrace") as r:
        assert (len(r), r.chunk_count, r.meta) == (0, 0, {"x": 1})
        assert replay(r, lambda *a: "allow").events == 0
    assert len(import_trace_cmd(["nothing here"])) == 0


def test_bench_smoke():
    res = bench_replay(30_000, sample=3_000, repeat=1, chunk_events=10_000, out=None)
    assert res["events"] == 30_000 and res["chunks"] == 3 and res["python_eps"] > 0
    assert sum(res["totals"].values()) == 30_000


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
    cols = _columns(recs, ts, LAYOUT)
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
    cols = _columns(recs, ts, LAYOUT)
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
    m = _Merger()
    m.push(cols([30, 10, 50]))
    assert m.pop(watermark=35)["time_ns"].tolist() == [10, 30]
    m.push(cols([40, 20]))              # 20 arrived late: still emitted (it is below nothing held)
    assert m.pop(watermark=45)["time_ns"].tolist() == [20, 40]
    m.push(None)
    assert m.pop(None)["time_ns"].tolist() == [50]
    assert m.pop(None) is None


def test_parse_lines_helper():
    events, stats = parse_lines(["a-1 [000] 1.0: kvm_msr: msr_read 10 = 0x5", "nonsense"])
    assert events == [(1_000000000, 1, 0x10, False, 5, False)] and stats.other_lines == 1
