"""MSR names and numbers, looked up in the data file msr_names.tsv (loaded once, on first use).

Canonical names are the Intel SDM's IA32_* names for architectural MSRs and the Linux kernel's
macro names otherwise (msr-index.h, hvgdk_mini.h, kvm_para.h).  A lookup accepts, ignoring case,
the canonical name, an alias from the table, or either of those with its MSR_ prefix added or
removed or its IA32_ prefix removed (MSR_EFER, EFER, msr_ia32_tsc, lstar) -- unless that derived
spelling would name two different MSRs.  Explicit names always win over derived ones.
"""
from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass
from importlib import resources
from typing import Iterator

from ..uapi import U32

GROUPS = frozenset({"arch", "intel", "amd", "kvm", "hyperv", "x2apic"})
DATA_FILE = "msr_names.tsv"

_HEX = re.compile(r"0[xX][0-9a-fA-F]+(?:_[0-9a-fA-F]+)*")
_DEC = re.compile(r"[0-9]+")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


@dataclass(frozen=True)
class MsrInfo:
    """One row of the table."""
    index: int
    name: str           # canonical spelling
    group: str          # one of GROUPS
    description: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Table:
    infos: tuple[MsrInfo, ...]       # sorted by index
    by_index: dict[int, MsrInfo]
    by_key: dict[str, int]           # upper-cased name -> index
    spelling: dict[str, str]         # upper-cased name -> spelling shown to people
    ambiguous: frozenset[str]        # derived spellings dropped because they name two MSRs


@functools.lru_cache(maxsize=None)
def _table() -> _Table:
    text = resources.files(__package__).joinpath(DATA_FILE).read_text(encoding="utf-8")
    return _parse(text, DATA_FILE)


def _derived(name: str) -> Iterator[str]:
    if name.startswith("MSR_"):
        yield name[4:]
    else:
        yield "MSR_" + name
    if name.startswith("IA32_"):
        yield name[5:]


def _parse(text: str, source: str = "<string>") -> _Table:
    """Parse the TSV (index, name, group, description[, space-separated aliases]).

    A malformed table is a bug in the package, so every problem raises ValueError with its line.
    """
    infos: list[MsrInfo] = []
    by_index: dict[int, MsrInfo] = {}
    explicit: dict[str, tuple[int, str]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        where = f"{source}:{lineno}"
        cols = line.split("\t")
        if len(cols) not in (4, 5):
            raise ValueError(f"{where}: expected 4 or 5 tab-separated columns, got {len(cols)}")
        idx_s, name, group, desc = (c.strip() for c in cols[:4])
        aliases = tuple(cols[4].split()) if len(cols) == 5 else ()
        if not _HEX.fullmatch(idx_s) or int(idx_s, 16) > U32:
            raise ValueError(f"{where}: index {idx_s!r} is not a 0x-prefixed u32")
        index = int(idx_s, 16)
        if group not in GROUPS:
            raise ValueError(f"{where}: group {group!r} not one of {sorted(GROUPS)}")
        if index in by_index:
            raise ValueError(f"{where}: index {index:#x} already named {by_index[index].name}")
        for n in (name, *aliases):
            if not _NAME.fullmatch(n):
                raise ValueError(f"{where}: {n!r} is not a valid MSR name")
            key = n.upper()
            if key in explicit:
                raise ValueError(f"{where}: name {n!r} already used for {explicit[key][0]:#x}")
            explicit[key] = (index, n)
        info = MsrInfo(index, name, group, desc, aliases)
        infos.append(info)
        by_index[index] = info

    derived: dict[str, tuple[set[int], str]] = {}
    for key, (index, spelled) in explicit.items():
        for d_spelled in _derived(spelled):
            d_key = d_spelled.upper()
            if d_key in explicit:
                continue
            derived.setdefault(d_key, (set(), d_spelled))[0].add(index)
    by_key = {k: i for k, (i, _) in explicit.items()}
    spelling = {k: s for k, (_, s) in explicit.items()}
    ambiguous = set()
    for d_key, (indices, spelled) in derived.items():
        if len(indices) > 1:
            ambiguous.add(d_key)
            continue
        by_key[d_key] = next(iter(indices))
        spelling[d_key] = spelled
    infos.sort(key=lambda i: i.index)
    return _Table(tuple(infos), by_index, by_key, spelling, frozenset(ambiguous))


def _number(text: str) -> int | None:
    if _HEX.fullmatch(text):
        return int(text, 16)
    if _DEC.fullmatch(text):
        return int(text, 10)
    return None


def msr_index(name: str) -> int | None:
    """The MSR number for a name or alias (any case), or a "0x1b" / "27" number; else None."""
    if not isinstance(name, str):
        return None
    text = name.strip()
    number = _number(text)
    if number is not None:
        return number if number <= U32 else None
    return _table().by_key.get(text.upper())


def msr_info(index: int) -> MsrInfo | None:
    """Everything the table knows about MSR `index`, or None."""
    if not isinstance(index, int) or isinstance(index, bool):
        return None
    return _table().by_index.get(index)


def msr_name(index: int) -> str | None:
    """The canonical name of MSR `index`, or None if the table does not know it."""
    info = msr_info(index)
    return info.name if info else None


def describe(index: int) -> str:
    """A name for messages: the canonical name, else MSR_0x<hex>.  Never raises."""
    try:
        name = msr_name(index)
        return name if name else f"MSR_{index:#x}"
    except Exception:
        return f"MSR_{index!r}"


def all_msrs() -> list[MsrInfo]:
    """Every MSR in the table, sorted by index."""
    return list(_table().infos)


def suggest(name: str, n: int = 3) -> list[str]:
    """Up to n known names close to `name` (difflib), best first, at most one per MSR."""
    if not isinstance(name, str) or not name.strip() or n <= 0:
        return []
    table = _table()
    out: list[str] = []
    seen: set[int] = set()
    for key in difflib.get_close_matches(name.strip().upper(), table.by_key, n=4 * n, cutoff=0.6):
        index = table.by_key[key]
        if index not in seen:
            seen.add(index)
            out.append(table.spelling[key])
            if len(out) == n:
                break
    return out
