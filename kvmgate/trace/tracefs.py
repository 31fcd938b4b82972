"""Record kvm:kvm_msr tracepoint events from every VM on the host, through tracefs.

The recorder works in a private ftrace *instance* (instances/kvmgate-<pid>): its own ring
buffers, event enables, pid list, filter and clock, so it never touches the global tracing
state or other tracing users.  It reads the per-CPU binary ring-buffer pages
(per_cpu/cpuN/trace_pipe_raw) and decodes them with numpy using the layout in the event's
`format` file.  The instance is removed afterwards, on error and on Ctrl-C too; instances left
by killed kvmgate processes are swept at the next recording.  tracefs is mounted at
/sys/kernel/tracing if it is mounted nowhere (and unmounted again afterwards).

What the tracepoint sees: KVM emits kvm_msr when it completes a guest RDMSR/WRMSR itself or
injects #GP for it (" (#GP)", exception=1).  Accesses that exit to user space
(KVM_EXIT_X86_RDMSR/WRMSR) are not traced, so record guests running without an MSR filter and
without user-space MSR exits to see everything they touch.

`pid`: a process id (e.g. QEMU's).  The tracepoint's common_pid is the *thread* id of the vCPU
thread, so the recorder puts every thread of that process into the instance's set_event_pid
and enables options/event-fork, which adds threads and children created later.  A thread id
selects its whole process too.  The trace's `pid` column holds thread ids; `meta["tasks"]`
maps each to its comm and tgid (looked up while the thread was alive).
"""
from __future__ import annotations

import ctypes
import errno
import itertools
import os
import platform
import re
import struct
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..errors import UserError
from .columns import default_host, vcpu_of_comm
from .memory import Trace
from .reading import TraceFile
from .writing import DEFAULT_FLUSH_SECONDS, TraceWriter

DEFAULT_ROOT = Path("/sys/kernel/tracing")
EVENT_DIR = Path("events/kvm/kvm_msr")
INSTANCE_PREFIX = "kvmgate-"
DEFAULT_BUFFER_KB = 4096          # per CPU
MAX_TOTAL_BUFFER_KB = 256 << 10   # all CPUs together
POLL_INTERVAL = 0.05
MERGE_SLACK_NS = 20_000_000       # events older than every CPU's last drain minus this are final

# ring buffer (kernel/trace/ring_buffer.c)
PAGE_HEADER = struct.Struct("<QQ")     # u64 time_stamp, local_t commit
RB_MISSED_EVENTS = 1 << 31
RB_MISSED_STORED = 1 << 30
COMMIT_SIZE_MASK = (1 << 30) - 1
TL_PADDING, TL_TIME_EXTEND, TL_TIME_STAMP = 29, 30, 31
TS_SHIFT = 27
TS_MSB_MASK = ~((1 << 59) - 1)


class TracefsError(UserError):
    """tracefs is missing, not writable, or refused a setting."""


# ---- tracefs location and mounting

def _tracefs_mounts() -> list[Path]:
    with open("/proc/mounts") as fh:
        return [Path(f[1]) for f in (line.split() for line in fh) if len(f) > 2 and f[2] == "tracefs"]


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def mount_tracefs(target: Path = DEFAULT_ROOT) -> None:
    """mount -t tracefs nodev TARGET (mount(2) through libc)."""
    if _libc().mount(b"nodev", str(target).encode(), b"tracefs", 0, None) != 0:
        e = ctypes.get_errno()
        raise TracefsError(f"cannot mount tracefs on {target}: {os.strerror(e)}"
                           + (" (needs root / CAP_SYS_ADMIN)" if e == errno.EPERM else ""))


def tracefs_root(mount: bool = True) -> tuple[Path, bool]:
    """Where tracefs is mounted, preferring /sys/kernel/tracing; mounts it there if `mount` and
    it is mounted nowhere.  Returns (path, mounted_by_this_call)."""
    mounts = _tracefs_mounts()
    for p in [DEFAULT_ROOT] + mounts:
        if p in mounts and (p / "instances").is_dir():
            return p, False
    if not mount:
        raise TracefsError("tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)")
    mount_tracefs(DEFAULT_ROOT)
    return DEFAULT_ROOT, True


def _umount(target: Path) -> None:
    _libc().umount2(str(target).encode(), 0)   # EBUSY if someone started using it: leave it


# ---- instances

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_instances(root: Path) -> list[str]:
    """Remove instances/kvmgate-<pid>[-n] whose process is gone; returns the names removed.
    (An instance still in use cannot be removed: the kernel answers EBUSY.)"""
    removed = []
    inst = root / "instances"
    for d in inst.glob(INSTANCE_PREFIX + "*"):
        m = re.fullmatch(re.escape(INSTANCE_PREFIX) + r"(\d+)(?:-\d+)?", d.name)
        if m and not _alive(int(m[1])):
            try:
                _disable_instance(d)
                d.rmdir()
                removed.append(d.name)
            except OSError:
                pass
    return removed


def _create_instance(root: Path) -> Path:
    inst = root / "instances"
    for n in itertools.count():
        d = inst / (f"{INSTANCE_PREFIX}{os.getpid()}" + (f"-{n}" if n else ""))
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
        except PermissionError:
            raise TracefsError(f"cannot create {d}: permission denied (needs root)") from None


def _write(path: Path, value: str, append: bool = False) -> None:
    """One write(2) of `value` to a tracefs file; errors name the file and the value."""
    try:
        with open(path, "a" if append else "w") as fh:
            fh.write(value)
    except OSError as e:
        raise TracefsError(f"writing {value.strip()!r} to {path}: {e.strerror}") from None


def _disable_instance(d: Path) -> None:
    for rel, value in (("tracing_on", "0"), (EVENT_DIR / "enable", "0")):
        try:
            (d / rel).write_text(value)
        except OSError:
            pass


# ---- the event layout

class EventLayout:
    """kvm_msr's record layout read from its `format` file (offsets, sizes, signedness)."""

    SIZES = {1: "u1", 2: "u2", 4: "u4", 8: "u8"}
    FIELD = re.compile(r"field:(?P<decl>[^;]*);\s*offset:(?P<off>\d+);\s*size:(?P<size>\d+);"
                       r"\s*signed:(?P<signed>\d)")

    def __init__(self, text: str):
        self.fields: dict[str, tuple[int, int, bool]] = {}
        for m in self.FIELD.finditer(text):
            name = re.split(r"[\s*]", m["decl"].strip())[-1].split("[")[0]
            self.fields[name] = (int(m["off"]), int(m["size"]), m["signed"] == "1")
        idm = re.search(r"^ID:\s*(\d+)", text, re.M)
        missing = {"common_type", "common_pid", "write", "ecx", "data"} - set(self.fields)
        if idm is None or missing:
            raise TracefsError(f"unexpected kvm_msr format (missing {sorted(missing) or 'ID'})")
        self.id = int(idm[1])
        self.size = max(o + s for o, s, _ in self.fields.values())
        self._dtypes: dict[int, np.dtype] = {}

    def dtype(self, itemsize: int) -> np.dtype:
        """A structured dtype over records `itemsize` bytes apart."""
        dt = self._dtypes.get(itemsize)
        if dt is None:
            names = [n for n in ("common_type", "common_pid", "write", "ecx", "data", "exception")
                     if n in self.fields]
            fmts = [("<i" if self.fields[n][2] else "<u") + self.SIZES[self.fields[n][1]][1:]
                    for n in names]
            dt = np.dtype({"names": names, "formats": fmts,
                           "offsets": [self.fields[n][0] for n in names], "itemsize": itemsize})
            self._dtypes[itemsize] = dt
        return dt


# ---- ring-buffer pages

def parse_page(page: bytes, layout: EventLayout) -> tuple[np.ndarray, np.ndarray, bool]:
    """Decode one ring-buffer page read from trace_pipe_raw: (records, timestamps, missed).

    A page is u64 time_stamp, local_t commit (data size; bit 31: events were lost before it),
    then events: a u32 header (type_len:5, time_delta:27) and data.  The common case (a page of
    same-size records, no time extends) is decoded without a Python loop.
    """
    ts0, commit = PAGE_HEADER.unpack_from(page, 0)
    size = min(commit & COMMIT_SIZE_MASK, len(page) - PAGE_HEADER.size) & ~3
    missed = bool(commit & RB_MISSED_EVENTS)
    if size <= 0:
        return np.zeros(0, layout.dtype(layout.size)), np.zeros(0, np.uint64), missed
    words = np.frombuffer(page, "<u4", size // 4, PAGE_HEADER.size)
    tl = int(words[0]) & 31
    if 1 <= tl <= 28 and (size // 4) % (tl + 1) == 0 and tl * 4 >= layout.size:
        rows = words.reshape(-1, tl + 1)
        hdr = rows[:, 0]
        if np.all((hdr & 31) == tl):
            ts = np.uint64(ts0) + np.cumsum(hdr >> 5, dtype=np.uint64)
            recs = np.ascontiguousarray(rows[:, 1:]).view(layout.dtype(tl * 4)).reshape(-1)
            return recs, ts, missed
    return _walk_page(page, size, ts0, layout) + (missed,)


def _walk_page(page: bytes, size: int, ts: int, layout: EventLayout) -> tuple[np.ndarray, np.ndarray]:
    """The general page walk: padding, time extends, absolute stamps, long records."""
    pos, end = PAGE_HEADER.size, PAGE_HEADER.size + size
    parts, stamps = [], []
    u32 = struct.Struct("<I").unpack_from
    need = layout.size
    while pos + 4 <= end:
        h = u32(page, pos)[0]
        tl, delta = h & 31, h >> 5
        if tl == TL_PADDING:
            if delta == 0:
                break                              # the rest of the page is empty
            ts += delta                            # a discarded event keeps its delta
            pos += 4 + u32(page, pos + 4)[0]
        elif tl == TL_TIME_EXTEND:
            ts += (u32(page, pos + 4)[0] << TS_SHIFT) + delta
            pos += 8
        elif tl == TL_TIME_STAMP:
            ts = ((u32(page, pos + 4)[0] << TS_SHIFT) + delta) | (ts & TS_MSB_MASK)
            pos += 8
        else:
            ts += delta
            if tl:
                start, length = pos + 4, tl * 4
            else:
                start, length = pos + 8, u32(page, pos + 4)[0] - 4
            if length >= need and start + need <= end:
                parts.append(page[start:start + need])
                stamps.append(ts)
            pos = start + ((length + 3) & ~3)
    recs = np.frombuffer(b"".join(parts), layout.dtype(need)) if parts else np.zeros(0, layout.dtype(need))
    return recs, np.array(stamps, np.uint64)


def event_columns(recs: np.ndarray, ts: np.ndarray, layout: EventLayout) -> dict:
    keep = recs["common_type"] == layout.id
    recs, ts = recs[keep], ts[keep]
    exc = recs["exception"] != 0 if "exception" in layout.fields else np.zeros(len(recs), bool)
    return {"index": recs["ecx"].astype(np.uint32), "write": recs["write"] != 0,
            "value": recs["data"].astype(np.uint64), "exception": exc,
            "pid": recs["common_pid"].astype(np.int32), "time_ns": ts.astype(np.int64)}


# ---- pids

def process_threads(pid: int) -> set[int]:
    """Thread ids of the process `pid` belongs to (/proc/PID/task)."""
    try:
        return {int(t) for t in os.listdir(f"/proc/{pid}/task")}
    except FileNotFoundError:
        raise UserError(f"no process with pid {pid}") from None


def _task_info(tid: int) -> dict | None:
    try:
        comm = Path(f"/proc/{tid}/comm").read_text().strip()
        status = Path(f"/proc/{tid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^Tgid:\s*(\d+)", status, re.M)
    return {"comm": comm, "tgid": int(m[1]) if m else None}


def _pids(pid) -> list[int]:
    if pid is None:
        return []
    return [int(pid)] if isinstance(pid, int) else [int(p) for p in pid]


# ---- the session

class TracefsSession:
    """A private tracefs instance with kvm:kvm_msr enabled; read() drains its per-CPU buffers.

    Use as a context manager; leaving it disables tracing and removes the instance.
    """

    def __init__(self, pid: int | Iterable[int] | None = None, *, event_filter: str | None = None,
                 buffer_kb: int | None = None, clock: str = "mono", mount: bool = True):
        self.pids = _pids(pid)
        self.event_filter = event_filter
        self.buffer_kb = buffer_kb
        self.clock_wanted = clock
        self.mount = mount
        self.root: Path | None = None
        self.instance: Path | None = None
        self.clock = "local"
        self.mounted = False
        self._fds: dict[int, int] = {}
        self.missed_pages = 0
        self.tasks: dict[int, dict | None] = {}
        self.last_drain_ns: dict[int, int] = {}

    # setup and teardown
    def __enter__(self):
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def _open(self) -> None:
        self.root, self.mounted = tracefs_root(self.mount)
        if not (self.root / EVENT_DIR).is_dir():
            raise TracefsError(f"{self.root / EVENT_DIR} is missing: is the kvm module loaded?")
        self.layout = EventLayout((self.root / EVENT_DIR / "format").read_text())
        for p in self.pids:
            process_threads(p)                          # fail early on a bad pid
        sweep_stale_instances(self.root)
        d = self.instance = _create_instance(self.root)
        _write(d / "tracing_on", "0")
        cpus = sorted(int(p.name[3:]) for p in (d / "per_cpu").glob("cpu[0-9]*"))
        kb = self.buffer_kb or max(64, min(DEFAULT_BUFFER_KB, MAX_TOTAL_BUFFER_KB // max(1, len(cpus))))
        _write(d / "buffer_size_kb", str(kb))
        self.page_size = self._page_size(d)
        try:
            _write(d / "trace_clock", self.clock_wanted)
            self.clock = self.clock_wanted
        except TracefsError:
            self.clock = re.search(r"\[(\w[\w-]*)\]", (d / "trace_clock").read_text())[1]
        _write(d / "options/overwrite", "0")           # full buffer: drop new events, counted
        if self.pids:
            self._set_pids(d)
        if self.event_filter:
            self._set_filter(d)
        _write(d / EVENT_DIR / "enable", "1")
        _write(d / "trace", "")                        # clear (the instance is new anyway)
        for cpu in cpus:
            try:
                self._fds[cpu] = os.open(d / f"per_cpu/cpu{cpu}/trace_pipe_raw",
                                         os.O_RDONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno not in (errno.ENODEV, errno.ENOENT):   # offline CPU: skip it
                    raise
        self.started_ns = time.monotonic_ns()
        self.started_wall = time.time()
        _write(d / "tracing_on", "1")

    @staticmethod
    def _page_size(d: Path) -> int:
        try:
            return int((d / "buffer_subbuf_size_kb").read_text()) * 1024
        except (OSError, ValueError):
            return os.sysconf("SC_PAGE_SIZE")

    def _set_pids(self, d: Path) -> None:
        """Threads of each process into set_event_pid, then event-fork, then threads born since."""
        tids = set().union(*(process_threads(p) for p in self.pids))
        _write(d / "set_event_pid", " ".join(map(str, sorted(tids))))
        _write(d / "options/event-fork", "1")
        late = set().union(*(process_threads(p) for p in self.pids if _alive(p))) - tids
        if late:
            _write(d / "set_event_pid", " ".join(map(str, sorted(late))), append=True)

    def _set_filter(self, d: Path) -> None:
        try:
            _write(d / EVENT_DIR / "filter", self.event_filter)
        except TracefsError:
            detail = (d / EVENT_DIR / "filter").read_text().strip()
            raise TracefsError(f"kvm_msr filter {self.event_filter!r} rejected: {detail}") from None

    def close(self) -> None:
        """Stop tracing, close the buffers, remove the instance (and unmount what we mounted)."""
        d, self.instance = self.instance, None
        if d is not None:
            _disable_instance(d)
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        if d is not None:
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        break
                    time.sleep(0.01)
        if self.mounted:
            self.mounted = False
            _umount(self.root)

    # reading
    def stop_tracing(self) -> None:
        if self.instance is not None:
            _write(self.instance / "tracing_on", "0")

    def read(self) -> tuple[dict | None, bool]:
        """Drain every CPU buffer: (columns of the new events or None, whether events flow fast)."""
        batches, busy = [], False
        for cpu, fd in self._fds.items():
            while True:
                try:
                    page = os.read(fd, self.page_size)
                except BlockingIOError:
                    page = b""
                if not page:
                    self.last_drain_ns[cpu] = time.monotonic_ns()
                    break
                recs, ts, missed = parse_page(page, self.layout)
                self.missed_pages += missed
                if len(recs):
                    batches.append(event_columns(recs, ts, self.layout))
                # a page at least half full: events are flowing fast, do not sleep
                busy |= (PAGE_HEADER.unpack_from(page)[1] & COMMIT_SIZE_MASK) >= self.page_size // 2
        if not batches:
            return None, busy
        cols = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
        for tid in np.unique(cols["pid"]).tolist():
            if tid not in self.tasks:
                self.tasks[tid] = _task_info(tid)
        vcpus = {tid: vcpu_of_comm((info or {}).get("comm")) for tid, info in self.tasks.items()}
        cols["vcpu"] = np.array([vcpus.get(t, -1) for t in cols["pid"].tolist()], np.int16) \
            if any(v >= 0 for v in vcpus.values()) else np.full(len(cols["pid"]), -1, np.int16)
        return cols, busy

    def watermark_ns(self) -> int | None:
        """Events stamped before this are all read (only for a clock comparable with ours)."""
        if self.clock != "mono" or not self.last_drain_ns:
            return None
        return min(self.last_drain_ns.values()) - MERGE_SLACK_NS

    def lost_events(self) -> int:
        """Events the kernel dropped or overwrote (per_cpu/cpuN/stats)."""
        lost = 0
        for cpu in self._fds:
            try:
                text = (self.instance / f"per_cpu/cpu{cpu}/stats").read_text()
            except (OSError, TypeError):
                continue
            for key in ("overrun", "dropped events"):
                m = re.search(rf"^{key}:\s*(\d+)", text, re.M)
                lost += int(m[1]) if m else 0
        return lost

    def meta(self) -> dict:
        return {"source": "tracefs", "event": "kvm:kvm_msr", "clock": self.clock,
                "kernel": platform.release(), "host": default_host(),
                "pid_filter": self.pids, "event_filter": self.event_filter,
                "started_unix": self.started_wall,
                "tasks": {str(k): v for k, v in sorted(self.tasks.items()) if v}}


class TimeMerger:
    """Holds back the newest events until every CPU has been drained past them, so the output
    is in time order across CPUs (per poll round only, when the clock is not comparable)."""

    def __init__(self):
        self.pending: list[dict] = []

    def push(self, cols: dict | None) -> None:
        if cols is not None and len(cols["index"]):
            self.pending.append(cols)

    def pop(self, watermark: int | None) -> dict | None:
        if not self.pending:
            return None
        cols = {k: np.concatenate([p[k] for p in self.pending]) for k in self.pending[0]}
        order = np.argsort(cols["time_ns"], kind="stable")
        cols = {k: v[order] for k, v in cols.items()}
        cut = len(order) if watermark is None else int(np.searchsorted(cols["time_ns"], watermark, "right"))
        self.pending = [{k: v[cut:] for k, v in cols.items()}] if cut < len(order) else []
        return {k: v[:cut] for k, v in cols.items()} if cut else None


class _Loop:
    """One recording: drain, merge, hand events to `sink`, report progress, decide when to stop."""

    def __init__(self, session: TracefsSession, sink, duration, stop, progress, tick=None):
        self.s, self.sink, self.duration, self.stop, self.progress = session, sink, duration, stop, progress
        self.on_tick = tick
        self.merger = TimeMerger()
        self.events = 0
        self.t0 = time.monotonic()
        self.last_progress = 0.0

    def drain(self, final: bool = False) -> bool:
        """Read every CPU and pass on the events that are final; True if events flow fast."""
        cols, busy = self.s.read()
        self.merger.push(cols)
        out = self.merger.pop(None if final else self.s.watermark_ns())
        if out is not None:
            self.events += len(out["index"])
            self.sink(out)
        return busy

    def tick(self, force: bool = False) -> float:
        if self.on_tick is not None:
            self.on_tick()
        now = time.monotonic() - self.t0
        if self.progress is not None and (force or now - self.last_progress >= 0.1):
            self.progress(self.events, now)
            self.last_progress = now
        return now

    def run(self) -> str:
        """Until duration, stop or Ctrl-C; returns which one ended it."""
        try:
            while True:
                busy = self.drain()
                now = self.tick()
                if self.stop is not None and self.stop.is_set():
                    return "stop"
                if self.duration is not None and now >= self.duration:
                    return "duration"
                if not busy:
                    self._sleep(now)
        except KeyboardInterrupt:
            return "interrupt"

    def _sleep(self, now: float) -> None:
        wait = POLL_INTERVAL if self.duration is None else min(POLL_INTERVAL, self.duration - now)
        if self.stop is not None:
            self.stop.wait(max(0.0, wait))
        else:
            time.sleep(max(0.0, wait))


def _record(sink: Callable[[dict], None], duration, pid, stop, progress, ready, opts, tick=None) -> dict:
    """The recording shared by record_tracefs and record_tracefs_to; returns the metadata."""
    if duration is not None and duration < 0:
        raise ValueError("duration must be >= 0")
    with TracefsSession(pid, **opts) as s:
        loop = _Loop(s, sink, duration, stop, progress, tick)
        if ready is not None:
            ready.set()
        reason = loop.run()
        s.stop_tracing()
        loop.drain(final=True)
        seconds = loop.tick(force=True)
        meta = s.meta()
        meta.update(duration_s=seconds, stopped_by=reason, events=loop.events,
                    lost_events=s.lost_events(), missed_pages=s.missed_pages)
    return meta


def record_tracefs(duration: float | None = None, pid: int | Iterable[int] | None = None,
                   stop: threading.Event | None = None,
                   progress: Callable[[int, float], None] | None = None, *,
                   event_filter: str | None = None, buffer_kb: int | None = None,
                   ready: threading.Event | None = None) -> Trace:
    """Record kvm:kvm_msr events (tracefs instance, per-CPU trace_pipe_raw) into memory.

    Runs until `duration` seconds have passed, `stop` is set, or Ctrl-C (KeyboardInterrupt ends
    the recording normally).  `pid`: a process (all its threads, see the module docstring).
    `event_filter`: an ftrace filter for the event, e.g. "ecx == 0xc0000080 && write == 1".
    `progress(events, seconds)` is called about ten times a second; `ready` is set once the
    event is enabled.  Lost events are counted in `meta["lost_events"]`.
    """
    parts: list[dict] = []
    meta = _record(parts.append, duration, pid, stop, progress, ready,
                   {"event_filter": event_filter, "buffer_kb": buffer_kb})
    if parts:
        cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return Trace.from_arrays(**cols, host=meta["host"], meta=meta)
    return Trace.from_arrays(np.zeros(0, np.uint32), None, host=meta["host"], meta=meta)


def record_tracefs_to(path, duration: float | None = None, pid: int | Iterable[int] | None = None,
                      stop: threading.Event | None = None,
                      progress: Callable[[int, float], None] | None = None, *,
                      event_filter: str | None = None, buffer_kb: int | None = None,
                      ready: threading.Event | None = None,
                      flush_seconds: float = DEFAULT_FLUSH_SECONDS,
                      row_group_events: int | None = None) -> TraceFile:
    """Like record_tracefs, streaming into a Parquet trace at `path`, crash-safe: events are
    flushed to PATH.parts/ every `flush_seconds` (and every full row group); a recording killed
    on the way keeps everything up to its last flush there (kvmgate.trace.writing)."""
    kw = {"row_group_events": row_group_events} if row_group_events else {}
    with TraceWriter(path, crash_safe=True, flush_seconds=flush_seconds, **kw) as w:
        w.meta.update(_record(lambda cols: w.append(**cols), duration, pid, stop, progress, ready,
                              {"event_filter": event_filter, "buffer_kb": buffer_kb},
                              tick=w.flush_due))
    return TraceFile(path)


class Recording:
    """Record in a background thread around a block of code:

        with Recording(pid=os.getpid()) as rec:
            machine.run()
        rec.trace    # a Trace

    The event is enabled before the block starts; the buffers are drained when it ends.
    `start()` before the `with` block starts it early (so a failure to start can be told apart
    from a failure inside the block); entering the block then does not start it again.
    """

    def __init__(self, pid: int | Iterable[int] | None = None, *, event_filter: str | None = None,
                 buffer_kb: int | None = None, start_timeout: float = 30):
        self._kw = {"pid": pid, "event_filter": event_filter, "buffer_kb": buffer_kb}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._timeout = start_timeout
        self._error: BaseException | None = None
        self.trace: Trace | None = None

    def _main(self) -> None:
        try:
            self.trace = record_tracefs(stop=self._stop, ready=self._ready, **self._kw)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            self._error = e
            self._ready.set()

    def start(self) -> "Recording":
        """Start recording; returns once the event is enabled (TracefsError if it cannot start)."""
        if getattr(self, "_thread", None) is not None:
            return self
        self._thread = threading.Thread(target=self._main, name="kvmgate-trace", daemon=True)
        self._thread.start()
        if not self._ready.wait(self._timeout):
            self._stop.set()
            raise TracefsError("the tracefs recorder did not start in time")
        if self._error is not None:
            raise self._error
        return self

    def __enter__(self) -> "Recording":
        return self.start()

    def __exit__(self, etype, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self._error is not None and etype is None:
            raise self._error
