"""Learn a minimal deny-by-default policy from what a guest does.

    result = learn("guest.S")                  # a path, assembly text or flat-binary bytes
    result.accesses                            # one LearnedAccess per (MSR, direction)
    write_policy(result, "policy.toml")        # TOML in kvmgate's format (load_policy reads it)

The guest runs once, every MSR access is recorded with its outcome, and the policy allows exactly
the (MSR, direction) pairs the guest used successfully: consecutive MSRs with the same access
become `range` rules (a range allows everything in it, so only exact runs), the rest `msrs`
lists with names; reads and writes are kept apart.  Accesses that KVM itself answered with #GP
are not allowed (they would #GP anyway; the default deny gives the guest the same #GP and logs
it) and are listed as comments.

Recorders:

  tracefs  the kernel's kvm:kvm_msr tracepoint (kvmgate.trace, a private ftrace instance, this
           process's threads only) while the guest runs with no filter and no user-space exits:
           every access KVM completes or fails itself, exactly as it happened.  On VMX/SVM hosts
           KVM lets the guest touch a few MSRs without any exit (FS/GS/KERNEL_GS base, SYSENTER,
           SVM's STAR..SFMASK, VMX's TSC reads, SPEC_CTRL once written, ...: msr.bitmaps), which
           the tracepoint never sees; those are "guarded": denied by a filter and carried out
           from user space like the exits recorder does.  kvm_pvm hosts trap every access, so
           there nothing is guarded.
  exits    no tracing needed: a filter that denies every MSR (DEFAULT_DENY) with FILTER exits;
           each access is carried out from user space with host-initiated KVM_GET_MSRS /
           KVM_SET_MSRS and recorded.  x2APIC MSRs (0x800-0x8ff) cannot be filtered: the ones
           KVM completes are not seen (no policy can deny them either); the ones it fails exit
           (INVAL/UNKNOWN) and are recorded as KVM failures.
  auto     tracefs when a recording can start, else exits.

Host-initiated accesses are checked less strictly by KVM than the guest's own (e.g. KVM_GET_MSRS
reads IA32_ARCH_CAPABILITIES or MCG_CTL where the guest's RDMSR gets #GP), so with verify=True
(default) every (MSR, direction) carried out from user space is re-checked afterwards as a guest
access in a scratch VM (MsrProber.classify, no filter): one KVM would fail for the guest is not
allowed.  They also differ in side effects: a guest WRMSR IA32_TSC moves IA32_TSC_ADJUST, a
host-initiated one does not, so under the exits recorder the guest may read other values than it
would natively (the learned rules are the same; only the comments' values differ).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import InjectGP, KvmError, PolicyError, UserError
from .msr import bitmaps, names
from .msr.model import (DEFAULT_ALLOW, DEFAULT_DENY, EXIT_REASON_FILTER, EXIT_REASON_INVAL,
                        EXIT_REASON_UNKNOWN, READ, WRITE, X2APIC_FIRST, X2APIC_LAST, KernelMsr,
                        MsrFilter, MsrRange, windows)

RECORDERS = ("auto", "tracefs", "exits")
MAX_VALUES = 4            # distinct values kept per (MSR, direction, outcome)
MIN_RUN = 3               # consecutive MSRs that become a `range` rule
GUEST_SUFFIXES = {".bin", ".img", ".raw"}

# MSRs KVM may let a VMX/SVM guest access without an exit (so without a kvm_msr event):
# msr.bitmaps' default lists and SPEC_CTRL, plus what it leaves to configuration: XFD/XFD_ERR,
# CET, APERF/MPERF and C-state residency (KVM_X86_DISABLE_EXITS_*), mediated-PMU counters.
GUARDED_MSRS: tuple[int, ...] = tuple(sorted(
    {m for m, _ in (*bitmaps.DEFAULT_VMX_PASSTHROUGH, *bitmaps.DEFAULT_SVM_PASSTHROUGH,
                    *bitmaps.SPEC_CTRL_PASSTHROUGH)}
    | {0x1C4, 0x1C5}                                            # IA32_XFD, IA32_XFD_ERR
    | set(range(0x6A0, 0x6A9))                                  # CET: U_CET .. INT_SSP_TAB
    | {0xE7, 0xE8} | {0x3F8, 0x3F9, 0x3FA, 0x3FC, 0x3FD, 0x3FE}  # MPERF, APERF, C-states
    | set(range(0xC1, 0xC9)) | set(range(0x186, 0x18E)) | set(range(0x4C1, 0x4C9))
    | {0x309, 0x30A, 0x30B, 0x38D, 0x38E, 0x38F, 0x390}         # Intel PMU
    | set(range(0xC0010000, 0xC0010008)) | set(range(0xC0010200, 0xC001020C))
    | {0xC0000300, 0xC0000301, 0xC0000302}))                    # AMD PMU


def _guard_filter() -> MsrFilter:
    points = list(GUARDED_MSRS)
    guarded = set(points)
    ranges = [MsrRange.from_bits(READ | WRITE, lo, [i not in guarded for i in range(lo, hi + 1)])
              for lo, hi in windows(points)]
    flt = MsrFilter(ranges, DEFAULT_ALLOW)
    flt.validate()
    return flt


DENY_ALL = MsrFilter([MsrRange(READ | WRITE, 0, 1, b"\x00")], DEFAULT_DENY)


def hardware_passthrough() -> bool:
    """Could KVM let the guest touch MSRs without exiting?  Not on kvm_pvm hosts (every access
    traps); yes with kvm_intel / kvm_amd, and assumed yes when unsure."""
    mods = Path("/sys/module")
    if (mods / "kvm_pvm").exists():
        return (mods / "kvm_intel").exists() or (mods / "kvm_amd").exists()
    return True


# ---- the result

@dataclass
class LearnedAccess:
    """Everything seen for one MSR in one direction."""
    index: int
    write: bool
    events: int = 0
    failed: int = 0                      # events the guest got #GP for (KVM failed them)
    values: tuple[int, ...] = ()         # up to MAX_VALUES distinct values of completed events
    failed_values: tuple[int, ...] = ()  # ... and of failed ones (written values; reads: 0)
    first_ns: int = 0
    forwarded: bool = False              # carried out from user space (host-initiated)
    check: str | None = None             # forwarded: guest-initiated re-check (KernelMsr value)

    @property
    def name(self) -> str | None:
        return names.msr_name(self.index)

    @property
    def direction(self) -> str:
        return "write" if self.write else "read"

    @property
    def allowed(self) -> bool:
        """Used successfully (and, if carried out from user space, valid as a guest access)."""
        if self.forwarded and self.check is not None:
            return self.check == KernelMsr.HANDLED.value
        return self.events > self.failed

    def why_not(self) -> str:
        if self.allowed:
            return ""
        if self.forwarded and self.check is not None:
            if self.failed < self.events:
                return (f"KVM_{'SET' if self.write else 'GET'}_MSRS worked, but KVM fails the "
                        f"guest's own access ({self.check})")
            return f"KVM itself answered #GP ({self.check})"
        return "KVM itself answered #GP"

    def to_dict(self) -> dict:
        return {"msr": f"{self.index:#x}", "name": self.name, "access": self.direction,
                "events": self.events, "gp": self.failed, "allowed": self.allowed,
                "values": [f"{v:#x}" for v in self.values],
                "failed_values": [f"{v:#x}" for v in self.failed_values],
                "forwarded": self.forwarded, "check": self.check, "reason": self.why_not()}


@dataclass
class LearnResult:
    accesses: list[LearnedAccess]        # sorted by (index, write)
    recorder: str                        # "tracefs" or "exits"
    guest: str                           # what ran (a path or "<assembly>" / "<binary>")
    halted: bool                         # False: stopped at the timeout
    seconds: float
    events: int
    gp_faults: int | None                # #GPs the guest runtime reported (None on timeout)
    guarded: tuple[int, ...] = ()        # MSRs carried out from user space under tracefs
    notes: list[str] = field(default_factory=list)
    trace: object = None                 # the events as a kvmgate.trace.Trace
    meta: dict = field(default_factory=dict)

    def allowed(self) -> list[LearnedAccess]:
        return [a for a in self.accesses if a.allowed]

    def refused(self) -> list[LearnedAccess]:
        return [a for a in self.accesses if not a.allowed]

    def access(self, index: int, write: bool) -> LearnedAccess | None:
        for a in self.accesses:
            if a.index == index and a.write == bool(write):
                return a
        return None

    def policy_text(self, name: str | None = None, *, min_run: int = MIN_RUN,
                    exclude: Iterable = ()) -> str:
        """The learned policy as TOML (parsed and compiled before it is returned).
        `exclude`: MSR indices, or (index, write) pairs, to leave out (denied by the default)."""
        stem = Path(self.guest).stem if not self.guest.startswith("<") else "guest"
        return render_policy(self.accesses, name=name or f"learned-{stem}", min_run=min_run,
                             exclude=exclude, header=self._header())

    def policy(self, **kw):
        from .policy import parse_policy
        return parse_policy(self.policy_text(**kw), "<learned>")

    def _header(self) -> list[str]:
        how = {"tracefs": "the kernel's kvm:kvm_msr tracepoint (tracefs)",
               "exits": "user-space MSR exits (every MSR filtered, carried out with KVM_GET/SET_MSRS)"}
        lines = [f"Learned by `kvmgate learn` from {self.guest}",
                 f"on {platform.node()} (Linux {platform.release()}), "
                 f"{_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
                 f"recorder: {how.get(self.recorder, self.recorder)}",
                 f"guest {'halted' if self.halted else 'stopped at the timeout'} after "
                 f"{self.seconds:.3f} s: {self.events} MSR accesses, {len(self.accesses)} "
                 f"MSR/direction pairs, {len(self.allowed())} allowed"]
        if self.guarded:
            lines.append(f"{len(self.guarded)} MSRs KVM may pass through to the guest were "
                         "filtered and carried out from user space while learning")
        return lines + self.notes

    def to_dict(self) -> dict:
        return {"guest": self.guest, "recorder": self.recorder, "halted": self.halted,
                "seconds": round(self.seconds, 6), "events": self.events,
                "gp_faults": self.gp_faults, "guarded": [f"{m:#x}" for m in self.guarded],
                "allowed": len(self.allowed()), "refused": len(self.refused()),
                "notes": self.notes, "accesses": [a.to_dict() for a in self.accesses]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


# ---- recording

class _Forwarder:
    """MSR exit handler: a FILTER exit is carried out with host-initiated KVM_GET/SET_MSRS; an
    INVAL/UNKNOWN exit (an unfilterable x2APIC MSR KVM failed) gets #GP.  Records every one."""

    def __init__(self, machine):
        self.machine = machine
        self.events: list[tuple] = []   # (time_ns, tid, index, write, value, exception)
        self.keys: set[tuple[int, bool]] = set()

    def __call__(self, ex):
        t, tid = time.monotonic_ns(), threading.get_native_id()
        if ex.reason != EXIT_REASON_FILTER:
            self.events.append((t, tid, ex.index, bool(ex.is_write), ex.data, True))
            return InjectGP
        vcpu = self.machine.vcpus[ex.vcpu]
        self.keys.add((ex.index, bool(ex.is_write)))
        try:
            if ex.is_write:
                value, ok = ex.data, vcpu.set_msrs({ex.index: ex.data}) == 1
            else:
                got = vcpu.get_msrs([ex.index])
                value, ok = got.get(ex.index, 0), ex.index in got
        except KvmError:
            value, ok = (ex.data if ex.is_write else 0), False
        self.events.append((t, tid, ex.index, bool(ex.is_write), value, not ok))
        if not ok:
            return InjectGP
        return None if ex.is_write else value

    def columns(self) -> dict:
        ev = self.events
        return {"time_ns": np.array([e[0] for e in ev], np.uint64),
                "pid": np.array([e[1] for e in ev], np.int32),
                "index": np.array([e[2] for e in ev], np.uint32),
                "write": np.array([e[3] for e in ev], bool),
                "value": np.array([e[4] for e in ev], np.uint64),
                "exception": np.array([e[5] for e in ev], bool)}


def _run(machine, timeout: float | None):
    """(RunResult or None, halted)."""
    try:
        return machine.run(timeout=timeout), True
    except TimeoutError:
        return None, False


class _TracefsUnavailable(Exception):
    """The tracefs recording could not start; nothing has run."""


def _record_tracefs(machine, timeout, guard: bool):
    from .trace import Recording, TracefsError
    rec = Recording(pid=os.getpid())
    try:
        rec.__enter__()
    except (TracefsError, OSError) as e:
        raise _TracefsUnavailable(e) from e
    fwd = None
    try:
        if guard:
            machine.set_msr_filter(_guard_filter())
            machine.enable_user_space_msr(EXIT_REASON_FILTER)
            fwd = _Forwarder(machine)
            machine.on_msr(fwd)
        result, halted = _run(machine, timeout)
    except BaseException as e:
        rec.__exit__(type(e), e, e.__traceback__)
        raise
    rec.__exit__(None, None, None)
    return rec.trace, fwd, result, halted


def _record_exits(machine, timeout):
    machine.set_msr_filter(DENY_ALL)
    machine.enable_user_space_msr(EXIT_REASON_FILTER | EXIT_REASON_INVAL | EXIT_REASON_UNKNOWN)
    fwd = _Forwarder(machine)
    machine.on_msr(fwd)
    result, halted = _run(machine, timeout)
    return fwd, result, halted


def _merge(trace, fwd):
    """The tracefs trace plus the forwarded events, in time order (one Trace)."""
    from .trace import Trace
    cols = {k: getattr(trace, k) for k in ("index", "write", "value", "exception", "pid", "time_ns")} \
        if trace is not None else None
    if fwd is not None and fwd.events:
        extra = fwd.columns()
        cols = extra if cols is None else {k: np.concatenate([cols[k], extra[k]]) for k in cols}
    meta = dict(trace.meta) if trace is not None else {"source": "exits"}
    if cols is None or not len(cols["index"]):
        return Trace(meta=meta)
    order = np.argsort(cols["time_ns"], kind="stable")
    return Trace.from_arrays(**{k: v[order] for k, v in cols.items()}, meta=meta)


# ---- aggregation

def _aggregate(trace) -> dict[tuple[int, bool], LearnedAccess]:
    """Per (index, write): events, #GPs, first time, a few distinct values (from the chunks'
    dictionaries; the per-event columns are touched once, vectorised)."""
    out: dict[tuple[int, bool], LearnedAccess] = {}
    vals: dict[tuple[int, bool, bool], set[int]] = {}
    for chunk in trace.iter_chunks():
        k = chunk.nkeys
        order = np.lexsort((chunk.value, chunk.codes))
        c, v = chunk.codes[order], chunk.value[order]
        first = np.ones(c.shape[0], bool)
        first[1:] = (c[1:] != c[:-1]) | (v[1:] != v[:-1])
        c, v = c[first], v[first]
        lo = np.searchsorted(c, np.arange(k), "left")
        hi = np.searchsorted(c, np.arange(k), "right")
        for j, (index, write, exc, n, t0) in enumerate(zip(
                chunk.key_index.tolist(), chunk.key_write.tolist(), chunk.key_exception.tolist(),
                chunk.key_count.tolist(), chunk.key_first_ns.tolist())):
            key = (index, bool(write))
            a = out.get(key)
            if a is None:
                a = out[key] = LearnedAccess(index, bool(write), first_ns=t0)
            a.events += n
            a.failed += n if exc else 0
            a.first_ns = min(a.first_ns, t0)
            s = vals.setdefault((index, bool(write), bool(exc)), set())
            if len(s) < MAX_VALUES:
                s.update(v[lo[j]:min(hi[j], lo[j] + MAX_VALUES)].tolist())
    for (index, write, exc), s in vals.items():
        kept = tuple(sorted(s)[:MAX_VALUES])
        if exc:
            out[(index, write)].failed_values = kept
        else:
            out[(index, write)].values = kept
    return out


def _verify(accesses: dict[tuple[int, bool], LearnedAccess], keys: set) -> None:
    """Re-check forwarded (MSR, direction) pairs as guest accesses in a scratch VM."""
    from .probe import Access, MsrProber
    todo = sorted((accesses[k] for k in keys if k in accesses), key=lambda a: a.first_ns)
    if not todo:
        return
    table, owner = [], []
    for a in todo:
        a.forwarded = True
        values = (a.values + a.failed_values) if a.write else (0,)
        for value in dict.fromkeys(values or (0,)):
            table.append(Access(a.index, WRITE if a.write else READ, value))
            owner.append(a)
    with MsrProber() as prober:
        kinds = prober.classify(table)
    seen: dict[int, list[KernelMsr]] = {}
    for a, k in zip(owner, kinds):
        seen.setdefault(id(a), []).append(k)
    for a in todo:
        ks = seen[id(a)]
        a.check = KernelMsr.HANDLED.value if KernelMsr.HANDLED in ks else ks[0].value


# ---- guests

def load_guest(path) -> str | bytes:
    """A guest program file: assembly text (.S or anything that decodes) or a flat binary
    (.bin/.img/.raw, or anything that is not UTF-8).  UserError if it cannot be read."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read guest: {e.strerror}", str(path)) from None
    if p.suffix.lower() in GUEST_SUFFIXES:
        return data
    try:
        return data.decode()
    except UnicodeDecodeError:
        return data


def _guest(guest) -> tuple[str | bytes, str]:
    if isinstance(guest, os.PathLike) or (isinstance(guest, str) and "\n" not in guest
                                          and os.path.isfile(guest)):
        return load_guest(guest), str(guest)
    if isinstance(guest, (bytes, bytearray)):
        return bytes(guest), "<binary>"
    if isinstance(guest, str):
        return guest, "<assembly>"
    raise TypeError(f"guest: a path, assembly text or bytes, not {type(guest).__name__}")


# ---- learn

def learn(guest, recorder: str = "auto", timeout: float | None = 60.0, *, vcpus: int = 1,
          mem_size: int = 4 << 20, verify: bool = True, guard: bool | None = None) -> LearnResult:
    """Run `guest` once, recording every MSR access and its outcome; see the module docstring.

    `guest`: a path (str without newlines naming a file, or PathLike), assembly text, or bytes.
    `timeout`: seconds; a guest that has not halted by then is stopped and what it did until
    then is learned (`halted` is False).  `guard`: filter the MSRs KVM may pass through under
    the tracefs recorder (None: unless the host traps every access, see hardware_passthrough).
    """
    from .machine import Machine
    if recorder not in RECORDERS:
        raise UserError(f"recorder {recorder!r}: one of {', '.join(RECORDERS)}")
    program, label = _guest(guest)
    guard = hardware_passthrough() if guard is None else bool(guard)
    notes: list[str] = []
    trace = fwd = None
    started = time.monotonic()
    with Machine(program, vcpus=vcpus, mem_size=mem_size) as m:
        used = recorder
        if recorder in ("auto", "tracefs"):
            try:
                trace, fwd, result, halted = _record_tracefs(m, timeout, guard)
                used = "tracefs"
            except _TracefsUnavailable as e:
                cause = e.__cause__
                if recorder == "tracefs":
                    if isinstance(cause, UserError):
                        raise cause from None
                    raise UserError(f"tracefs recording cannot start: {cause}") from None
                notes.append(f"tracefs unavailable ({cause}); recorded with user-space exits")
                used = "exits"
        if used == "exits":
            fwd, result, halted = _record_exits(m, timeout)
    seconds = result.seconds if result is not None else time.monotonic() - started
    merged = _merge(trace, fwd)
    accesses = _aggregate(merged)
    if verify and fwd is not None:
        _verify(accesses, fwd.keys)
    gp = len(result.gp_faults) if result is not None else None
    traced_gp = int(np.count_nonzero(merged.exception)) if len(merged) else 0
    if not halted:
        notes.append(f"the guest did not halt within {timeout} s: learned from what it did until then")
    if trace is not None:
        lost = trace.meta.get("lost_events", 0) + trace.meta.get("missed_pages", 0)
        if lost:
            notes.append(f"tracefs lost events ({lost}): the policy may miss accesses; record again")
    if gp is not None and gp != traced_gp:
        notes.append(f"the guest reported {gp} #GP faults but {traced_gp} failed accesses were "
                     "recorded (another VM in this process, or lost events?)")
    if used == "exits":
        notes.append("x2APIC MSRs (0x800-0x8ff) that KVM completes are not seen by this recorder; "
                     "KVM never filters them, so no policy can deny them")
    meta = {k: v for k, v in merged.meta.items() if k != "tasks"}
    return LearnResult(accesses=[accesses[k] for k in sorted(accesses)], recorder=used,
                       guest=label, halted=halted, seconds=seconds, events=len(merged),
                       gp_faults=gp, guarded=GUARDED_MSRS if used == "tracefs" and guard else (),
                       notes=notes, trace=merged, meta=meta)


# ---- the policy text

def _runs(points: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for p in points:
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def _msr_ref(index: int) -> str:
    """A TOML value naming the MSR: its canonical name when that resolves back, else hex."""
    n = names.msr_name(index)
    return json.dumps(n) if n and names.msr_index(n) == index else f"{index:#x}"


def _times(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _hexes(values: tuple[int, ...]) -> str:
    return ", ".join(f"{v:#x}" for v in values[:3]) + (", ..." if len(values) > 3 else "")


def _describe(index: int, by: dict) -> str:
    """A comment for one MSR: events per direction, written values, #GPs."""
    parts = []
    for write in (False, True):
        a = by.get((index, write))
        if a is None:
            continue
        text = _times(a.events, "write" if write else "read")
        if write and a.values:
            text += f" ({_hexes(a.values)})"
        if a.failed:
            text += f", {a.failed} #GP"
        parts.append(text)
    if X2APIC_FIRST <= index <= X2APIC_LAST:
        parts.append("x2APIC: never filtered")
    return "; ".join(parts)


def render_policy(accesses: Iterable[LearnedAccess], *, name: str = "learned", min_run: int = MIN_RUN,
                  exclude: Iterable = (), header: Iterable[str] = ()) -> str:
    """Deny-by-default TOML allowing the allowed accesses (see the module docstring)."""
    from .policy import compile_policy, parse_policy
    accesses = list(accesses)
    drop_msrs = {x for x in exclude if isinstance(x, int)}
    drop_keys = {(int(x[0]), bool(x[1])) for x in exclude if not isinstance(x, int)}
    by = {(a.index, a.write): a for a in accesses}
    ok = [a for a in accesses if a.allowed and a.index not in drop_msrs
          and (a.index, a.write) not in drop_keys]
    reads = {a.index for a in ok if not a.write}
    writes = {a.index for a in ok if a.write}
    out = [f"# {line}" for line in header]
    out += ["[policy]", f"name = {json.dumps(name)}",
            'default = "deny"          # anything the guest was not seen to use: #GP',
            "log = true                # ... and an audit record", ""]
    nrules = 0
    for cls, access, title in ((reads & writes, "both", "read and written"),
                               (reads - writes, "read", "read only"),
                               (writes - reads, "write", "written only")):
        if not cls:
            continue
        out.append(f"# ---- {title}: {_times(len(cls), 'MSR')}")
        singles = []
        for run in _runs(sorted(cls)):
            if len(run) < max(2, min_run):
                singles += run
                continue
            lo, hi = run[0], run[-1]
            ends = f"{names.describe(lo)} .. {names.describe(hi)}"
            out += [f"[[rule]]                  # {len(run)} MSRs {lo:#x}..{hi:#x}: {ends}",
                    f"range = [{_msr_ref(lo)}, {_msr_ref(hi)}]",
                    f'access = "{access}"', 'action = "allow"', ""]
            nrules += 1
        if singles:
            out += ["[[rule]]", f'access = "{access}"', 'action = "allow"', "msrs = ["]
            refs = [_msr_ref(i) + "," for i in singles]
            width = max(len(r) for r in refs)
            for i, ref in zip(singles, refs):
                out.append(f"    {ref.ljust(width)}  # {i:#x}: {_describe(i, by)}")
            out += ["]", ""]
            nrules += 1
    if not nrules:
        out += ["# (no MSR access to allow)", ""]
    refused = [a for a in accesses if not a.allowed]
    if refused:
        out.append("# ---- not allowed: the guest gets the same #GP it got when learning, "
                   "from the default deny (logged)")
        for a in refused:
            vals = f" of {_hexes(a.failed_values or a.values)}" if a.write else ""
            x2 = ("; x2APIC: never filtered, KVM's own #GP" if X2APIC_FIRST <= a.index <= X2APIC_LAST
                  else "")
            out.append(f"#   {a.index:#x} {names.describe(a.index)} {a.direction}{vals}: "
                       f"{_times(a.events, 'time')}: {a.why_not()}{x2}")
        out.append("")
    dropped = sorted({(a.index, a.write) for a in accesses if a.allowed} - {(a.index, a.write) for a in ok})
    if dropped:
        out.append("# ---- left out on request (denied although the guest used them)")
        out += [f"#   {i:#x} {names.describe(i)} {'write' if w else 'read'}" for i, w in dropped]
        out.append("")
    out += ["[unknown]                 # MSRs KVM does not implement: #GP, as KVM would",
            'action = "gp"', "",
            "[invalid]                 # accesses KVM refuses: #GP, as KVM would",
            'action = "gp"', ""]
    text = "\n".join(out)
    try:
        compile_policy(parse_policy(text, "<learned>"))
    except PolicyError as e:
        raise PolicyError(f"the learned policy cannot be enforced: {e.what}", e.where) from None
    return text


def write_policy(result: LearnResult | str, path, **kw) -> Path:
    """Write the learned policy (a LearnResult, or policy text) to `path` atomically.
    Keyword arguments go to LearnResult.policy_text().  UserError if it cannot be written."""
    text = result if isinstance(result, str) else result.policy_text(**kw)
    p = Path(path)
    if p.is_dir():
        raise UserError("is a directory", str(p))
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, p)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise UserError(f"cannot write policy: {e.strerror}", str(p)) from None
    return p


__all__ = ["learn", "LearnResult", "LearnedAccess", "render_policy", "write_policy", "load_guest",
           "RECORDERS", "GUARDED_MSRS", "hardware_passthrough"]
