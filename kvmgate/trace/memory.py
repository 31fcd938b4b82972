"""A trace in memory (Trace) and joining traces (concat)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from .columns import columns, concat_columns, default_host
from .parquet_out import write_file
from .schema import ROW_GROUP_EVENTS
from .summary import Summary


class Trace:
    """kvm_msr events in memory: columns (see columns()), host names, metadata."""

    def __init__(self, cols: dict | None = None, hosts: list[str] | None = None, meta: dict | None = None):
        if cols is None:
            cols = columns(np.zeros(0, np.uint32), None)
            cols["host"] = np.zeros(0, np.int32)
        self.cols = cols
        self.hosts = list(hosts or [])
        self.meta = dict(meta or {})

    @classmethod
    def from_arrays(cls, index, write, value=None, exception=None, pid=None, time_ns=None, *,
                    vcpu=None, host: str | None = None, meta: dict | None = None) -> "Trace":
        cols = columns(index, write, value, exception, pid, time_ns, vcpu)
        cols["host"] = np.zeros(cols["index"].shape[0], np.int32)
        return cls(cols, [host or default_host()], meta)

    def __len__(self) -> int:
        return int(self.cols["index"].shape[0])

    def __repr__(self) -> str:
        return f"<Trace {len(self)} events, hosts {self.hosts}>"

    def __getattr__(self, name):
        cols = self.__dict__.get("cols")
        if cols is not None and name in cols and name != "host":
            return cols[name]
        raise AttributeError(name)

    def events(self) -> Iterator[tuple[int, int, int, bool, int, bool]]:
        """(time_ns, pid, index, write, value, exception) per event, in order (slow; for people)."""
        c = self.cols
        yield from zip(c["time_ns"].tolist(), c["pid"].tolist(), c["index"].tolist(),
                       c["write"].tolist(), c["value"].tolist(), c["exception"].tolist())

    def summary(self) -> Summary:
        return Summary.from_columns(self.cols, self.hosts)

    def save(self, path, *, row_group_events: int = ROW_GROUP_EVENTS) -> Path:
        """Write as a Parquet trace file."""
        write_file(path, self.cols, self.hosts, self.meta, row_group_events)
        return Path(path)


def concat(traces: list[Trace], meta: dict | None = None) -> Trace:
    """One trace of several (hosts matched by name), in the given order."""
    hosts: dict[str, int] = {}
    parts = []
    for t in traces:
        remap = np.array([hosts.setdefault(h, len(hosts)) for h in t.hosts] or [0], np.int32)
        c = dict(t.cols)
        c["host"] = remap[c["host"]] if len(t) else c["host"]
        parts.append(c)
    if not parts:
        return Trace(meta=meta)
    return Trace(concat_columns(parts), list(hosts), meta if meta is not None else dict(traces[0].meta))


__all__ = ["Trace", "concat"]
