"""Import kvm:kvm_msr events from text: `trace-cmd report` output or ftrace's `trace`/`trace_pipe`.

A line looks like

    qemu-system-x86-1234  [001]  5678.901234: kvm_msr: msr_write c0000082 = 0xffffffff81a00000
    CPU 0/KVM-1240 (   1234) [003] d..1. 5678.901299: kvm_msr:   msr_read 1b = 0xfee00900 (#GP)

(comm-tid, optional tgid, [cpu], optional latency flags, timestamp in seconds, event, fields;
print fmt "msr_%s %x = 0x%llx%s").  Other events are skipped and counted by name; headers,
blank lines and anything else are counted too; nothing stops an import.
"""
from __future__ import annotations

import os
import re
import stat
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..errors import UserError

from .columns import vcpu_of_comm
from .memory import Trace
from .reading import TraceFile
from .writing import TraceWriter

EVENT_LINE = re.compile(
    r"^\s*(?P<comm>.*?)-(?P<pid>\d+)\s+"
    r"(?:\(\s*(?:\d+|-+)\s*\)\s+)?"         # tgid column (options/record-tgid)
    r"\[(?P<cpu>\d+)\]\s+"
    r"(?:[^\s:]{1,8}\s+)?"                  # latency flags such as "d..1." or "....."
    r"(?P<sec>\d+)(?:\.(?P<frac>\d{1,9}))?:\s+"
    r"(?P<event>[\w:.-]+):\s*(?P<rest>.*?)\s*$")
MSR_FIELDS = re.compile(
    r"^msr_(?P<dir>read|write)\s+(?:0x)?(?P<index>[0-9a-fA-F]{1,8})\s*=\s*"
    r"(?P<value>0x[0-9a-fA-F]{1,16}|\d+)(?P<gp>\s*\(#GP\))?$")
MSR_EVENTS = frozenset({"kvm_msr", "kvm:kvm_msr"})
MAX_EXAMPLES = 5


class ImportStats:
    """What an import saw: kvm_msr events taken, other events skipped, lines not understood."""

    def __init__(self):
        self.lines = 0
        self.events = 0
        self.skipped_events: Counter = Counter()
        self.malformed = 0          # kvm_msr lines whose fields do not parse
        self.other_lines = 0        # headers, blank lines, garbage
        self.examples: list[str] = []

    def as_dict(self) -> dict:
        return {"lines": self.lines, "events": self.events,
                "skipped_events": dict(self.skipped_events.most_common()),
                "malformed": self.malformed, "other_lines": self.other_lines,
                "malformed_examples": self.examples}


def parse_line(line: str):
    """(time_ns, tid, index, write, value, exception, vcpu) for a kvm_msr line (vcpu -1 unless
    the thread is QEMU's "CPU n/KVM"), the event name for another
    event's line, "malformed" for a kvm_msr line that does not parse, None for anything else."""
    m = EVENT_LINE.match(line)
    if m is None:
        return None
    if m["event"] not in MSR_EVENTS:
        return m["event"]
    f = MSR_FIELDS.match(m["rest"])
    if f is None:
        return "malformed"
    value = int(f["value"], 0)
    if value >> 64:
        return "malformed"
    t = int(m["sec"]) * 1_000_000_000 + int((m["frac"] or "0").ljust(9, "0"))
    if t >= 1 << 63:
        return "malformed"
    pid = int(m["pid"])
    if pid >= 1 << 31:
        return "malformed"
    return (t, pid, int(f["index"], 16), f["dir"] == "write", value, f["gp"] is not None,
            vcpu_of_comm(m["comm"].strip()))


def _lines(source) -> Iterator[str]:
    if isinstance(source, (str, Path)):
        try:
            st = os.stat(source)
        except OSError as e:
            raise UserError(f"cannot read report: {e.strerror}", str(source)) from None
        if not stat.S_ISREG(st.st_mode):
            raise UserError("not a regular file", str(source))
        with open(source, encoding="utf-8", errors="replace") as fh:
            yield from fh
    else:
        yield from source


def iter_batches(source, stats: ImportStats, batch: int = 1 << 18) -> Iterator[dict]:
    """Column batches of at most `batch` events parsed from a path or an iterable of lines."""
    cols = ([], [], [], [], [], [], [])
    for line in _lines(source):
        stats.lines += 1
        r = parse_line(line)
        if type(r) is tuple:
            for c, v in zip(cols, r):
                c.append(v)
            stats.events += 1
            if len(cols[0]) >= batch:
                yield _arrays(cols)
                cols = ([], [], [], [], [], [], [])
        elif r is None:
            stats.other_lines += 1
        elif r == "malformed":
            stats.malformed += 1
            if len(stats.examples) < MAX_EXAMPLES:
                stats.examples.append(f"line {stats.lines}: {line.rstrip()[:200]}")
        else:
            stats.skipped_events[r] += 1
    if cols[0]:
        yield _arrays(cols)


def _arrays(cols) -> dict:
    t, pid, index, write, value, exc, vcpu = cols
    return {"time_ns": np.array(t, np.int64), "pid": np.array(pid, np.int32),
            "index": np.array(index, np.uint32), "write": np.array(write, bool),
            "value": np.array(value, np.uint64), "exception": np.array(exc, bool),
            "vcpu": np.array(vcpu, np.int16)}


def _meta(source, stats: ImportStats) -> dict:
    name = str(source) if isinstance(source, (str, Path)) else "<lines>"
    return {"source": "text", "file": name, "clock": "unknown (trace-cmd/ftrace timestamps)",
            "import": stats.as_dict()}


def _host(source, host: str | None) -> str:
    if host:
        return host
    return Path(source).stem if isinstance(source, (str, Path)) else "unknown"


def import_trace_cmd(source, *, host: str | None = None) -> Trace:
    """kvm_msr events of a `trace-cmd report` (or ftrace text) file/iterable, in memory.
    Statistics of skipped and unparsed lines are in `trace.meta["import"]`.  `host`: the host
    the report was recorded on (default: the file's stem)."""
    stats = ImportStats()
    batches = list(iter_batches(source, stats))
    cols = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]} if batches \
        else _arrays(([], [], [], [], [], [], []))
    return Trace.from_arrays(**cols, host=_host(source, host), meta=_meta(source, stats))


def import_trace_cmd_to(source, path, *, host: str | None = None,
                        row_group_events: int | None = None) -> TraceFile:
    """Like import_trace_cmd, streaming into a Parquet trace file at `path` (bounded memory)."""
    stats = ImportStats()
    kw = {"row_group_events": row_group_events} if row_group_events else {}
    with TraceWriter(path, meta=_meta(source, stats), host=_host(source, host), **kw) as w:
        for b in iter_batches(source, stats):
            w.append(**b)
        w.meta["import"] = stats.as_dict()
    return TraceFile(path)


def parse_lines(lines: Iterable[str]) -> tuple[list[tuple], ImportStats]:
    """Every kvm_msr event of `lines` as tuples (for small inputs and tests)."""
    stats = ImportStats()
    out = []
    for b in iter_batches(lines, stats):
        out += zip(*(b[k].tolist() for k in ("time_ns", "pid", "index", "write", "value", "exception", "vcpu")))
    return out, stats
