"""Load and call the C engine (the optional extension kvmgate.engine._engine).

`Engine(cp)` builds the table (table.py), validates it in C and decides exits against a
`State` (the emulated registers, in an anonymous shared mapping: pass the same State to the
Engine of a reloaded policy and the registers carry over, as handlers.Registers does)."""
from __future__ import annotations

import mmap
from typing import NamedTuple

from .table import KIND_NAMES, KINDS, STATE_DEFAULT_SLOTS, EngineTable, build_table

try:
    from . import _engine
    _IMPORT_ERROR = ""
except ImportError as e:          # built without a C compiler: the Python exit path is used
    _engine = None
    _IMPORT_ERROR = "kvmgate.engine._engine is missing" if "_engine" in str(e) and \
        "cannot import name" in str(e) else str(e)

# KG_RES_*
RES_VALUE, RES_WRITTEN, RES_DROPPED, RES_GP, RES_HOST = 1, 2, 3, 4, 5
# KG_DF_*
DF_LOG, DF_COUNT, DF_WOULD_DENY, DF_VALUE_DEP, DF_STATE_FULL = 0x01, 0x02, 0x04, 0x08, 0x10
REASON_FILTER, REASON_UNKNOWN, REASON_INVAL = 4, 2, 1


class EngineUnavailable(RuntimeError):
    """The C engine was not built (no C compiler when kvmgate was installed)."""


def available() -> bool:
    """Whether the C engine extension is importable."""
    return _engine is not None


def unavailable_reason() -> str:
    return "" if _engine is not None else (
        f"C engine not built ({_IMPORT_ERROR}): install kvmgate where a C compiler is "
        "available (pip install .)")


def _need():
    if _engine is None:
        raise EngineUnavailable(unavailable_reason())
    return _engine


def native():
    """The extension module kvmgate.engine._engine (EngineUnavailable if not built)."""
    return _need()


def result_text(result: int, value: int, would_deny: bool = False) -> str:
    """The audit log's result text, as handlers.perform writes it ("read 0x5", "written",
    "dropped", "#GP"); audit mode's would-deny decisions say so: "read 0x5 (would #GP)"."""
    if result == RES_VALUE:
        text = f"read {value:#x}"
    elif result == RES_WRITTEN:
        text = "written"
    elif result == RES_DROPPED:
        text = "dropped"
    elif result == RES_GP:
        text = "#GP"
    else:
        text = "host access pending"
    return f"{text} (would #GP)" if would_deny else text


class Decision(NamedTuple):
    """One kg_decision, readable."""
    result: int             # RES_*
    value: int              # RES_VALUE: what the read returns
    action: str | None      # deny | ignore | constant | emulate | forward; None: no action (#GP)
    rule: str               # the rule's description ("" for none)
    flags: int              # DF_*

    @property
    def log(self) -> bool:
        return bool(self.flags & DF_LOG)

    @property
    def counted(self) -> bool:
        return bool(self.flags & DF_COUNT)

    @property
    def would_deny(self) -> bool:
        return bool(self.flags & DF_WOULD_DENY)

    @property
    def host(self) -> bool:
        """The caller must carry the access out host-initiated (forward, audit mode)."""
        return self.result == RES_HOST

    def text(self) -> str:
        return result_text(self.result, self.value, self.would_deny)

    def host_done(self, is_write: bool, ok: bool, value: int = 0) -> "Decision":
        """After a host-initiated access (kg_host_done): its result."""
        res, val, _a, _r, _f = _need().host_done(
            (self.result, self.value, 0, 0, self.flags), is_write, ok, value)
        return self._replace(result=res, value=val)


class State:
    """Emulated registers for the engine (struct kg_state) in an anonymous MAP_SHARED mapping,
    so a forked shim or a C run loop can share it; keyed by MSR index, never shrinking."""

    def __init__(self, slots: int = STATE_DEFAULT_SLOTS):
        eng = _need()
        self.slots = slots
        self.buffer = mmap.mmap(-1, eng.state_size(slots))
        eng.state_init(self.buffer, slots)

    def get(self, index: int) -> int | None:
        """The register's value if the guest wrote it, else None (reads give the initial)."""
        return _engine.state_get(self.buffer, index)


class Engine:
    """A CompiledPolicy loaded into the C engine.  `decide_raw` is the bare C call (a tuple
    (result, value, action, rule id, flags)); `decide` names things."""

    def __init__(self, cp, mode: str | None = None, state: State | None = None,
                 table: EngineTable | None = None):
        eng = _need()
        self.table = table if table is not None else build_table(cp, mode)
        self.state = state if state is not None else State()
        self._c = eng.Engine(self.table.data, self.state.buffer)
        self.decide_raw = self._c.decide

    @property
    def table_bytes(self) -> bytes:
        return self.table.data

    def _named(self, raw) -> Decision:
        res, value, action, rule, flags = raw
        return Decision(res, value, KIND_NAMES.get(action), self.table.rule(rule), flags)

    def decide(self, index: int, is_write: bool, reason: int, data: int = 0) -> Decision:
        """kg_decide for one exit (registers updated by emulate writes)."""
        return self._named(self._c.decide(index, is_write, reason, data))

    def verdict(self, index: int, is_write: bool, reason: int, data: int = 0) -> Decision:
        """kg_decide without register state: emulate reads give the initial value and writes
        are checked against it, nothing stored."""
        return self._named(self._c.verdict(index, is_write, reason, data))

    def record(self, d: Decision, *, vcpu: int, rip: int | None, index: int, is_write: bool,
               reason: int, data: int) -> bytes:
        """kg_record_fill: the 64-byte audit record for a decision (time: CLOCK_REALTIME now)."""
        rule = self.table.rules.index(d.rule) if d.rule in self.table.rules else 0xFFFFFFFF
        raw = (d.result, d.value, 0 if d.action is None else KINDS[d.action], rule, d.flags)
        return _engine.record_fill(raw, vcpu, rip or 0, rip is not None, index, is_write,
                                   reason, data)
