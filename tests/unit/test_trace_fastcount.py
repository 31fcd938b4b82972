"""--full-check on kvmgate trace files (kvmgate.trace.fastcount): the key columns counted from
the data must equal the stored key summaries.  A file whose summaries were made to disagree
with its events (checksums recomputed, so no CRC catches it) is counted from the summaries by
the default replay, and refused by --full-check."""
import base64
import json
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest

from kvmgate.trace import Trace, TraceFile, TraceFormatError, naive_counts, replay, report_counts
from kvmgate.trace.schema import META_KEY, WRITE_OPTIONS


def _decide(index, write, exception):
    return "deny" if (index + write + 2 * exception) % 3 == 0 else "allow"


@pytest.fixture
def trace(tmp_path):
    rng = np.random.default_rng(7)
    n = 5000
    cols = dict(index=rng.choice([0x10, 0x1B, 0x3A, 0xC0000080, 0x4B564DFF, 0xFFFFFFFF], n),
                write=rng.random(n) < 0.3, value=rng.integers(0, 2**63, n),
                exception=rng.random(n) < 0.1, pid=rng.integers(1, 4, n),
                time_ns=np.arange(n) * 1000)
    path = tmp_path / "t.parquet"
    Trace.from_arrays(**cols, host="h1").save(path, row_group_events=1200)
    return path, naive_counts(cols["index"], cols["write"], cols["exception"], _decide)


def test_full_check_counts_what_every_event_says(trace):
    path, want = trace
    assert report_counts(replay(path, _decide, full=True)) == want
    assert report_counts(replay(path, _decide)) == want
    assert TraceFile(path).summary(full=True).events == 5000


def _forge(path, out, mutate):
    """The same events with the kvmgate document changed by mutate(summary_arrays) and its CRC
    recomputed: nothing but the data can tell."""
    pf = pq.ParquetFile(path)
    doc = json.loads(pf.metadata.metadata[META_KEY])
    s = doc["summaries"][1]
    arrays = {k: np.frombuffer(base64.b64decode(s[k]), dt).copy()
              for k, dt in (("keys", "<u8"), ("count", "<i8"))}
    mutate(arrays)
    for k, a in arrays.items():
        s[k] = base64.b64encode(a.tobytes()).decode()
    body = {k: v for k, v in doc.items() if k != "crc"}
    doc["crc"] = zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    table = pf.read()
    table = table.replace_schema_metadata({**table.schema.metadata, META_KEY: json.dumps(doc)})
    pq.write_table(table, out, row_group_size=1200, **WRITE_OPTIONS)


def _move_one(a):                       # one event of the first key counted under the second
    a["count"][0] -= 1
    a["count"][1] += 1


def _rename_msr(a):                     # the last key says 0xfffffffe, the events 0xffffffff
    a["keys"][-1] -= 1


@pytest.mark.parametrize("mutate", [_move_one, _rename_msr])
def test_full_check_refuses_summaries_that_disagree_with_the_events(trace, tmp_path, mutate):
    path, want = trace
    forged = tmp_path / "forged.parquet"
    _forge(path, forged, mutate)
    assert TraceFile(forged).summary().events == 5000          # the default trusts the summaries
    with pytest.raises(TraceFormatError, match="row group 1.*disagree"):
        replay(forged, _decide, full=True)


def test_full_check_checks_pages_of_every_column(trace, tmp_path):
    path, _ = trace
    md = pq.ParquetFile(path).metadata
    col = md.row_group(2).column(md.schema.to_arrow_schema().names.index("value"))
    data = bytearray(path.read_bytes())
    data[col.data_page_offset + col.total_compressed_size - 3] ^= 0x40       # inside the page body
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(bytes(data))
    assert replay(bad, _decide).events == 5000                  # value is no key column
    with pytest.raises(TraceFormatError, match="row group 2, column 'value'.*checksum"):
        replay(bad, _decide, full=True)
