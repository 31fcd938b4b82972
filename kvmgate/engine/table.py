"""CompiledPolicy -> the C engine's binary table (csrc/engine.h, "KGE1" version 1).

The table carries exactly what kvmgate/policy/handlers.py decides from: the per-(MSR,
direction) actions as sorted disjoint spans per direction, the default action for FILTER exits
of MSRs listed nowhere, the [unknown] and [invalid] actions and the mode.  Rule descriptions
("FILE:LINE (rule N)", "[policy] default", "[unknown]") stay in Python: the table holds their
index into `EngineTable.rules`.  Pure: no ioctls, no C needed to build or read a table.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from ..errors import PolicyError
from ..msr.model import READ, WRITE
from ..uapi import U32, U64

MAGIC = 0x3145474B            # "KGE1"
VERSION = 1
NONE = 0xFFFFFFFF             # KG_NONE: no action / no rule

MODE_ENFORCE, MODE_AUDIT = 0, 1
MODES = {"enforce": MODE_ENFORCE, "audit": MODE_AUDIT}

# KG_ACT_*: the action kinds of kvmgate.policy.compile.Action, by number
KINDS = {"deny": 1, "ignore": 2, "constant": 3, "emulate": 4, "forward": 5}
KIND_NAMES = {v: k for k, v in KINDS.items()}
AF_LOG, AF_WRITES_GP, AF_HAS_ALLOWED = 0x01, 0x02, 0x04

STATE_DEFAULT_SLOTS = 4096     # KG_STATE_DEFAULT_SLOTS
MAX_EMULATED = STATE_DEFAULT_SLOTS // 2

HEADER = struct.Struct("<IHHIIIIIIIIIII12x")      # struct kg_table_header, 64 bytes
ACTION = struct.Struct("<BBHIQQII16x")            # struct kg_action, 48 bytes
SPAN = struct.Struct("<IIII")                     # struct kg_span, 16 bytes
CHECKSUM_AT = 12
assert HEADER.size == 64 and ACTION.size == 48 and SPAN.size == 16


class EngineTableError(PolicyError):
    """A compiled policy the engine's table cannot express (field out of range, too many
    emulated MSRs for the register state)."""


@dataclass(frozen=True)
class EngineTable:
    """A built table: its bytes and the rule descriptions its rule ids index."""
    data: bytes
    rules: tuple[str, ...]
    mode: str

    def rule(self, rule_id: int) -> str:
        return self.rules[rule_id] if 0 <= rule_id < len(self.rules) else ""


def _u64(value: int, what: str, where: str) -> int:
    if not isinstance(value, int) or not 0 <= value <= U64:
        raise EngineTableError(f"{what} {value!r} is not a 64-bit unsigned value", where)
    return value


def _spans(rows: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Sorted (lo, hi, action id) spans -> the same with adjacent spans of one action merged."""
    out: list[list[int]] = []
    for lo, hi, aid in sorted(rows):
        if out and out[-1][1] + 1 == lo and out[-1][2] == aid:
            out[-1][1] = hi
        else:
            out.append([lo, hi, aid])
    return [tuple(s) for s in out]


def _distinct(spans: list[tuple[int, int]]) -> int:
    """How many indices the inclusive spans cover together (overlaps counted once)."""
    total, end = 0, -1
    for lo, hi in sorted(spans):
        if hi > end:
            total += hi - max(lo, end + 1) + 1
            end = hi
    return total


def _action_rows(actions):
    """(lo, hi, is_write, action) spans of a CompiledPolicy's action table (ActionTable.rows(),
    or a plain {index << 1 | is_write: action} dict, one MSR per span)."""
    if hasattr(actions, "rows"):
        return actions.rows()
    return ((k >> 1, k >> 1, bool(k & 1), a) for k, a in sorted(actions.items()))


def mode_of(cp, mode: str | None = None) -> str:
    """The mode a table is built for: the argument, else the policy's `mode`, else enforce."""
    m = mode if mode is not None else getattr(cp.policy, "mode", None) or "enforce"
    if m not in MODES:
        raise EngineTableError(f"mode {m!r}: expected one of {', '.join(MODES)}",
                               getattr(cp.policy, "source", "<policy>"))
    return m


def build_table(cp, mode: str | None = None, registry: list[str] | None = None) -> EngineTable:
    """The engine table for CompiledPolicy `cp` (kvmgate.policy.compile).

    `registry`: rule descriptions shared by successive tables (policy reloads); new ones are
    appended, so a rule id means the same rule in every table built with it, and records still
    in a ring after a reload decode with the newest `EngineTable.rules`."""
    mode = mode_of(cp, mode)
    actions: list = []
    action_ids: dict = {}
    rules: list[str] = registry if registry is not None else []
    rule_ids: dict[str, int] = {r: i for i, r in enumerate(rules)}
    allowed_pool: list[int] = []
    packed: list[bytes] = []

    def action_id(act) -> int:
        if act is None:
            return NONE
        aid = action_ids.get(act)
        if aid is not None:
            return aid
        where = act.rule or "<policy>"
        kind = KINDS.get(act.kind)
        if kind is None:
            raise EngineTableError(f"action kind {act.kind!r} unknown to the engine", where)
        rid = rule_ids.get(act.rule)
        if rid is None:
            rid = rule_ids[act.rule] = len(rules)
            rules.append(act.rule)
        flags = AF_LOG if act.log else 0
        value = mask = off = n = 0
        if act.kind == "constant":
            value = _u64(act.value, "constant value", where)
            flags |= AF_WRITES_GP if act.writes == "gp" else 0
        elif act.kind == "emulate":
            value = _u64(act.initial, "initial value", where)
            mask = act.write_mask & U64           # handlers.perform masks with M64 too
            if act.allowed is not None:
                vals = sorted({_u64(v, "allowed value", where) for v in act.allowed})
                flags |= AF_HAS_ALLOWED
                off, n = len(allowed_pool), len(vals)
                allowed_pool.extend(vals)
        aid = action_ids[act] = len(actions)
        actions.append(act)
        packed.append(ACTION.pack(kind, flags, 0, rid, value, mask, off, n))
        return aid

    per_dir: dict[int, list[tuple[int, int, int]]] = {READ: [], WRITE: []}
    emulate_spans: list[tuple[int, int]] = []
    for lo, hi, write, act in _action_rows(cp.actions):
        if not 0 <= lo <= hi <= U32:
            raise EngineTableError(f"MSR span {lo:#x}..{hi:#x} is not within u32", act.rule)
        per_dir[WRITE if write else READ].append((lo, hi, action_id(act)))
        if act.kind == "emulate":
            emulate_spans.append((lo, hi))
    emulated = _distinct(emulate_spans)        # MSR indices with an emulated register
    if emulated > MAX_EMULATED:
        raise EngineTableError(
            f"{emulated} emulated MSRs: the engine's register state holds at most "
            f"{MAX_EMULATED}; emulate fewer MSRs", getattr(cp.policy, "source", "<policy>"))
    default = action_id(cp.default_action)
    unknown = action_id(cp.unknown)
    invalid = action_id(cp.invalid)
    reads, writes = _spans(per_dir[READ]), _spans(per_dir[WRITE])
    body = b"".join(packed) + b"".join(SPAN.pack(lo, hi, aid, 0) for lo, hi, aid in reads + writes) \
        + struct.pack(f"<{len(allowed_pool)}Q", *allowed_pool)
    size = HEADER.size + len(body)
    header = HEADER.pack(MAGIC, VERSION, HEADER.size, size, 0, MODES[mode], default, unknown,
                         invalid, len(actions), len(reads), len(writes), len(allowed_pool),
                         emulated)
    data = bytearray(header + body)
    struct.pack_into("<I", data, CHECKSUM_AT, zlib.crc32(data))
    return EngineTable(bytes(data), tuple(rules), mode)


@dataclass(frozen=True)
class TableView:
    """A table read back (for tests and `policy explain --table`): header fields and sections."""
    mode: int
    default: int
    unknown: int
    invalid: int
    actions: tuple[tuple, ...]      # (kind, flags, rule, value, write_mask, allowed_off, allowed_n)
    reads: tuple[tuple[int, int, int], ...]
    writes: tuple[tuple[int, int, int], ...]
    allowed: tuple[int, ...]
    nemulate: int


def read_table(data: bytes) -> TableView:
    """Parse a well-formed table (structure only; the C validator is the authority)."""
    (magic, version, hsize, size, _crc, mode, default, unknown, invalid, na, nr, nw, nal,
     nem) = HEADER.unpack_from(data, 0)
    if magic != MAGIC or version != VERSION or hsize != HEADER.size or size != len(data):
        raise ValueError("not a version 1 kvmgate engine table")
    off = HEADER.size
    acts = []
    for _ in range(na):
        kind, flags, _r, rule, value, mask, aoff, an = ACTION.unpack_from(data, off)
        acts.append((kind, flags, rule, value, mask, aoff, an))
        off += ACTION.size
    spans = []
    for _ in range(nr + nw):
        lo, hi, aid, _r = SPAN.unpack_from(data, off)
        spans.append((lo, hi, aid))
        off += SPAN.size
    allowed = struct.unpack_from(f"<{nal}Q", data, off)
    return TableView(mode, default, unknown, invalid, tuple(acts), tuple(spans[:nr]),
                     tuple(spans[nr:]), tuple(allowed), nem)
