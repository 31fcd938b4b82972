"""A trace's events as columns: numpy arrays in memory, Arrow tables of SCHEMA on disk.

A trace holds one array per column (schema.COLUMNS but "direction" as the bool array `write`),
all of one length, with "host" as codes into a separate list of host names."""
from __future__ import annotations

import platform
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..uapi import U32
from .schema import DIRECTIONS, SCHEMA
from .summary import TraceFormatError

_VCPU_COMM = re.compile(r"^CPU (\d+)/KVM")


def vcpu_of_comm(comm: str | None) -> int:
    """QEMU names its vCPU threads "CPU n/KVM": n, else -1 (unknown)."""
    m = _VCPU_COMM.match(comm or "")
    return int(m[1]) if m and int(m[1]) < 1 << 15 else -1


def default_host() -> str:
    return platform.node() or "localhost"



EVENT_DTYPES = {"index": np.uint32, "write": bool, "value": np.uint64, "exception": bool,
                 "pid": np.int32, "vcpu": np.int16, "time_ns": np.int64}


def columns(index, write, value=None, exception=None, pid=None, time_ns=None, vcpu=None) -> dict:
    """Normalised event columns: arrays of one length, defaults (zeros; vcpu -1 = unknown)."""
    index = np.asarray(index)
    n = index.shape[0] if index.ndim == 1 else -1
    if n < 0:
        raise ValueError("index must be one-dimensional")
    if index.size and (index.min() < 0 or index.max() > U32):
        raise ValueError("MSR index outside u32")
    out = {"index": index.astype(np.uint32, copy=False)}
    for name, a, default in (("write", write, 0), ("value", value, 0), ("exception", exception, 0),
                             ("pid", pid, 0), ("time_ns", time_ns, 0), ("vcpu", vcpu, -1)):
        if a is None:
            out[name] = np.full(n, default, EVENT_DTYPES[name])
            continue
        a = np.asarray(a)
        if a.shape != (n,):
            raise ValueError(f"{name}: shape {a.shape}, expected ({n},)")
        out[name] = a.astype(EVENT_DTYPES[name], copy=False)
    return out


def concat_columns(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def to_table(cols: dict, hosts: list[str]) -> pa.Table:
    """Event columns (host as codes into `hosts`) as an Arrow table of SCHEMA."""
    n = cols["index"].shape[0]
    vcpu = cols["vcpu"]
    return pa.Table.from_arrays([
        pa.array(cols["index"], pa.uint32()),
        pa.DictionaryArray.from_arrays(pa.array(cols["write"].astype(np.int8)), pa.array(DIRECTIONS)),
        pa.array(cols["value"], pa.uint64()),
        pa.array(cols["exception"], pa.bool_()),
        pa.array(cols["pid"], pa.int32()),
        pa.array(vcpu, pa.int16(), mask=vcpu < 0),
        pa.array(cols["time_ns"], pa.int64()),
        pa.DictionaryArray.from_arrays(pa.array(cols["host"].astype(np.int32), pa.int32()),
                                       pa.array(hosts or [""], pa.string())),
    ], schema=SCHEMA) if n else SCHEMA.empty_table()


def from_table(t: pa.Table, where: str, default_host_name: str) -> tuple[dict, list[str]]:
    """Event columns and host names of an Arrow table (ours or another tool's); TraceFormatError
    for missing columns, wrong types, nulls where there may be none, unknown directions."""
    def col(name, typ, required=True):
        if name not in t.column_names:
            if required:
                raise TraceFormatError(f"no column {name!r}", where)
            return None
        c = t.column(name)
        if pa.types.is_dictionary(c.type):
            c = c.cast(c.type.value_type)
        if c.null_count and name != "vcpu":
            raise TraceFormatError(f"column {name!r} has nulls", where)
        try:
            return c.cast(typ)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise TraceFormatError(f"column {name!r}: {str(e).splitlines()[0]}", where) from None
    n = t.num_rows
    index = col("index", pa.uint32()).to_numpy()
    d = col("direction", pa.string())
    write = pc.equal(d, "write").to_numpy(zero_copy_only=False).astype(bool)
    if n and not pc.all(pc.is_in(d, pa.array(DIRECTIONS))).as_py():
        raise TraceFormatError("column 'direction': values other than read/write", where)

    def opt(name, typ, fill):
        c = col(name, typ, required=False)
        if c is None:
            return np.full(n, fill, EVENT_DTYPES[name])
        if name == "vcpu":
            c = pc.fill_null(c, -1)
        return c.to_numpy(zero_copy_only=False).astype(EVENT_DTYPES[name])
    cols = {"index": index, "write": write, "value": opt("value", pa.uint64(), 0),
            "exception": opt("exception", pa.bool_(), False), "pid": opt("pid", pa.int32(), 0),
            "vcpu": opt("vcpu", pa.int16(), -1), "time_ns": opt("time_ns", pa.int64(), 0)}
    h = col("host", pa.string(), required=False)
    if h is None:
        cols["host"] = np.zeros(n, np.int32)
        return cols, [default_host_name]
    enc = pc.dictionary_encode(h).combine_chunks() if n else None
    if enc is None:
        cols["host"] = np.zeros(0, np.int32)
        return cols, []
    cols["host"] = enc.indices.to_numpy(zero_copy_only=False).astype(np.int32)
    return cols, [str(x) for x in enc.dictionary.to_pylist()]


__all__ = ["EVENT_DTYPES", "columns", "concat_columns", "to_table", "from_table", "vcpu_of_comm",
           "default_host"]
