"""One Parquet trace file being written: row groups, each with its key summary, then the
footer with the kvmgate document (schema.py), written aside and renamed into place."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .columns import to_table
from .schema import FORMAT, META_KEY, SCHEMA, VERSION, WRITE_OPTIONS, document_crc
from .summary import Summary


def json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (set, frozenset, tuple)):
        return sorted(o) if isinstance(o, (set, frozenset)) else list(o)
    return str(o)


class ParquetOut:
    """One Parquet trace file being written: row groups with their summaries, then the footer
    with the kvmgate document (written aside and renamed into place by close())."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.meta = meta
        self.summaries: list[dict] = []
        self.rows: list[int] = []
        self.w = pq.ParquetWriter(self.tmp, SCHEMA, **WRITE_OPTIONS)

    def write_group(self, cols: dict, hosts: list[str], summary: dict | None = None) -> None:
        n = int(cols["index"].shape[0])
        if not n:
            return
        self.w.write_table(to_table(cols, hosts), row_group_size=n)
        self.summaries.append(summary if summary is not None else Summary.from_columns(cols, hosts).to_json())
        self.rows.append(n)

    def close(self) -> None:
        doc = {"format": FORMAT, "version": VERSION, "events": sum(self.rows),
               "row_groups": len(self.rows), "rows": self.rows, "meta": self.meta,
               "summaries": self.summaries}
        doc = json.loads(json.dumps(doc, default=json_default))
        doc["crc"] = document_crc(doc)
        self.w.add_key_value_metadata({META_KEY: json.dumps(doc, separators=(",", ":"))})
        self.w.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.w.close()
        finally:
            self.tmp.unlink(missing_ok=True)



def write_file(path, cols: dict, hosts: list[str], meta: dict, row_group_events: int) -> None:
    """Events already in memory (host codes into `hosts`) as one trace file at `path`, in row
    groups of row_group_events; nothing is left behind if writing fails."""
    if not 1 <= row_group_events <= 1 << 26:
        raise ValueError("row_group_events: 1 .. 2**26")
    n = int(cols["index"].shape[0])
    codes: dict[str, int] = {}
    remap = np.array([codes.setdefault(h, len(codes)) for h in hosts] or [0], np.int32)
    if n:
        cols = dict(cols, host=remap[cols["host"]])
    out = ParquetOut(Path(path), dict(meta))
    try:
        for lo in range(0, n, row_group_events):
            out.write_group({k: v[lo:lo + row_group_events] for k, v in cols.items()}, list(codes))
        out.close()
    except BaseException:
        out.abort()
        raise


__all__ = ["ParquetOut", "write_file", "json_default"]
