"""Many trace files at once: paths and directories (one per host, say) into files, the per-file
work (open, check, summarise), run in this process or on a Dask cluster, and the merge.

    got = collect(["fleet/host-a", "fleet/host-b", "extra.parquet"], dask="local:4")
    got.summary            # one Summary over every file (hosts kept apart in its keys)
    got.files              # per file: events, row groups, hosts, partial

A directory contributes every *.parquet file under it.  A directory with a _RECORDING.json marker
is an unfinished recording (its writer was killed before it merged its parts): its events are
read and the result says it is partial (`partial` notes).  Damaged files are never skipped: the
first one stops everything with its TraceFormatError.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import UserError
from .memory import Trace, concat
from .reading import TraceFile
from .writing import MARKER, PART_GLOB
from .summary import Summary, TraceFormatError


@dataclass
class FileInfo:
    path: str
    events: int
    row_groups: int
    hosts: list[str]
    partial: bool = False            # part of an unfinished recording
    foreign: bool = False            # not written by kvmgate: read event by event

    def to_dict(self) -> dict:
        return {"path": self.path, "events": self.events, "row_groups": self.row_groups,
                "hosts": self.hosts, "partial": self.partial, "foreign": self.foreign}


@dataclass
class Collected:
    summary: Summary
    files: list[FileInfo]
    partial: list[str] = field(default_factory=list)     # one note per unfinished recording
    meta: dict = field(default_factory=dict)             # the first file's trace metadata

    @property
    def events(self) -> int:
        return self.summary.events


def _unfinished(d: Path) -> str:
    try:
        info = json.loads((d / MARKER).read_text())
        who = f"recorder pid {info.get('recorder_pid')}" if isinstance(info, dict) else "a recorder"
    except (OSError, ValueError):
        who = "a recorder"
    return who


def expand(paths) -> list[tuple[Path, bool]]:
    """(file, in an unfinished recording) for every trace file the paths name, in order, each once."""
    out: list[tuple[Path, bool]] = []
    seen = set()
    if not paths:
        raise UserError("no trace files given")
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            if (p / MARKER).exists():
                files = sorted(p.glob(PART_GLOB))
            else:
                files = sorted(f for f in p.rglob("*.parquet")
                               if not f.name.startswith(".") and f.is_file())
            if not files and not (p / MARKER).exists():
                raise UserError("no *.parquet trace files in this directory", str(p))
            for f in files:
                if f.resolve() not in seen:
                    seen.add(f.resolve())
                    out.append((f, (f.parent / MARKER).exists()))
        elif p.exists() or p.is_symlink():
            if p.resolve() not in seen:
                seen.add(p.resolve())
                out.append((p, False))
        else:
            raise UserError("cannot read trace: No such file or directory", str(p))
    return out


def summarize_file(path: str, full: bool = False, partial: bool = False):
    """The per-file work (run here or on a Dask worker): ("ok", Summary, FileInfo) or
    ("error", message) for a damaged file.  Picklable in and out."""
    try:
        f = TraceFile(path)
        s = f.summary(full=full)
        return "ok", s, FileInfo(str(path), f.events, f.row_groups, list(s.hosts), partial, f.foreign), f.meta
    except UserError as e:
        return "error", str(e)


def parse_dask(spec: str | None) -> str | None:
    """--dask: None, "local:N" (a LocalCluster of N workers in this process) or a scheduler
    address (tcp://host:port, host:port)."""
    if spec is None:
        return None
    spec = spec.strip()
    if spec.startswith("local:"):
        n = spec[6:]
        if not n.isdigit() or not 1 <= int(n) <= 256:
            raise UserError(f"{spec!r}: local:N with N workers, 1..256", "--dask")
        return spec
    if not spec or any(c.isspace() for c in spec) or ":" not in spec:
        raise UserError(f"{spec!r}: a scheduler address (tcp://HOST:PORT) or local:N", "--dask")
    return spec


DASK_CONNECT_TIMEOUT = 10.0      # seconds to reach a --dask scheduler before giving up

# --dask local:N's cluster: threads in this process, no dashboard, and the scheduler's HTTP
# server (health and metrics routes, which distributed starts even without a dashboard) on a
# free port rather than 8787, so two replays at once do not collide (distributed would fall
# back to another port but print "Port 8787 is already in use").
LOCAL_CLUSTER_OPTIONS = {"threads_per_worker": 1, "processes": False, "dashboard_address": None,
                         "scheduler_kwargs": {"dashboard_address": ":0"}}


def _map_dask(spec: str, fn: Callable, items: list) -> list:
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise UserError("--dask needs dask.distributed (pip install 'kvmgate[fleet]')") from None
    if spec.startswith("local:"):
        with LocalCluster(n_workers=int(spec[6:]), **LOCAL_CLUSTER_OPTIONS) as cluster, \
                Client(cluster) as client:
            return client.gather(client.map(fn, *zip(*items), pure=False))
    try:
        client = Client(spec, timeout=DASK_CONNECT_TIMEOUT)
    except (OSError, TimeoutError, ValueError) as e:
        raise UserError(f"cannot reach the Dask scheduler {spec}: {e}", "--dask") from None
    with client:
        return client.gather(client.map(fn, *zip(*items), pure=False))


def map_files(files: list[tuple[Path, bool]], full: bool = False, dask: str | None = None) -> list:
    """summarize_file over files, in order: in this process, or on Dask (same function)."""
    items = [(str(f), full, partial) for f, partial in files]
    if dask is None:
        return [summarize_file(*it) for it in items]
    return _map_dask(parse_dask(dask), summarize_file, items)


def collect(paths, *, full: bool = False, dask: str | None = None) -> Collected:
    """Open, check and summarise every trace file the paths name; merge (see the module docstring)."""
    files = expand(paths)
    results = map_files(files, full, dask)
    for r in results:
        if r[0] == "error":
            raise TraceFormatError(r[1])
    summaries = [r[1] for r in results]
    infos = [r[2] for r in results]
    partial = []
    for d in dict.fromkeys(f.parent for f, p in files if p):
        n = sum(i.events for i in infos if Path(i.path).parent == d)
        partial.append(f"{d}: unfinished recording (left by {_unfinished(d)}, killed before it "
                       f"finished?): {n} events recovered from its parts")
    for p in paths:                                   # an unfinished recording with no part yet
        p = Path(p)
        if p.is_dir() and (p / MARKER).exists() and not any(f.parent == p for f, _ in files):
            partial.append(f"{p}: unfinished recording with no events flushed")
    meta = results[0][3] if results else {}
    return Collected(Summary.merge(summaries), infos, partial, dict(meta))


def load_trace(path) -> Trace:
    """Every event of a trace file (or the files of a directory) in memory, checked."""
    files = [TraceFile(f) for f, _ in expand([path])]
    traces = [f.read() for f in files]
    return concat(traces, dict(files[0].meta) if files else {}) if traces else Trace()


def is_unfinished(path) -> bool:
    return Path(path).is_dir() and os.path.exists(Path(path) / MARKER)


__all__ = ["collect", "expand", "summarize_file", "map_files", "parse_dask", "load_trace",
           "Collected", "FileInfo", "is_unfinished"]
