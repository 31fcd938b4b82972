"""Parse a TOML policy (stdlib tomllib) into a Policy; every error names file, line and field.

The boundary for policy files: the file is read through kvmgate.inputs (regular files only, at
most MAX_POLICY_BYTES), must be UTF-8, and every value is checked for type, shape and range
before use, so a valid TOML document of the wrong shape is a PolicyError like any other."""
from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path

from ..errors import PolicyError
from ..inputs import MiB, decode_text, read_user_file
from ..msr import names
from ..msr.model import U32
from ..uapi import U64
from .compile import Policy
from .model import (
    ACCESS_WORDS,
    ACTIONS,
    FAILURE_ACTIONS,
    FailureAction,
    FailureRule,
    Rule,
    RuleAction,
)

MAX_POLICY_BYTES = 4 * MiB
MAX_AUDIT_RATE = 1e6          # records per second per MSR and direction
MAX_NAME = 200                # characters of an MSR name or a policy name
TOP_KEYS = {"policy", "rule", "unknown", "invalid"}
POLICY_KEYS = {"name", "default", "log", "x2apic", "host_ignore_msrs", "audit_rate", "audit_burst",
               "audit_failure", "mode"}
RULE_KEYS = {"msr", "msrs", "range", "access", "action", "log", "value", "writes", "initial",
             "write_mask", "allowed", "comment"}
FAILURE_KEYS = {"action", "log"}


class _Lines:
    """Maps tables and keys back to line numbers (tomllib gives none)."""

    def __init__(self, text: str, source: str):
        self.source = source
        self.lines = text.splitlines()
        self.rule_starts = [i + 1 for i, l in enumerate(self.lines)
                            if re.match(r"\s*\[\[\s*rule\s*\]\]", l)]
        self.tables: dict[str, int] = {}
        for i, l in enumerate(self.lines):
            m = re.match(r"\s*\[\s*([A-Za-z_]+)\s*\]\s*(#.*)?$", l) or \
                re.match(r"\s*([A-Za-z_]+)\s*[.=]", l)
            if m:
                self.tables.setdefault(m.group(1), i + 1)
        self.keys: dict[int, dict[str, int]] = {}      # section start line -> key -> line
        section = 1
        for i, l in enumerate(self.lines, 1):
            if re.match(r"\s*\[", l):
                section = i
                continue
            m = re.match(r"\s*[\"']?([A-Za-z0-9_-]+)[\"']?\s*=", l)
            if m:
                self.keys.setdefault(section, {}).setdefault(m.group(1), i)

    def key(self, start: int, key: str) -> int:
        """The line of `key` in the table that starts at line `start` (else `start`)."""
        return self.keys.get(start, {}).get(key, start)

    def where(self, line: int, what: str) -> str:
        return f"{self.source}:{line}: {what}"


def load_policy(path: str | Path) -> Policy:
    """Read and parse a policy file (PolicyError/InputFileError naming it on any failure)."""
    name = str(path)
    return parse_policy_bytes(read_user_file(path, "policy", MAX_POLICY_BYTES), name)


def parse_policy_bytes(data: bytes, source: str = "<policy>") -> Policy:
    """A policy file's bytes (UTF-8 TOML) -> Policy; PolicyError/InputFileError otherwise."""
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(f"policy is {len(data)} bytes; at most {MAX_POLICY_BYTES} are accepted", source)
    return parse_policy(decode_text(data, source, "policy"), source)


def _toml(text: str, source: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        where = f"{source}:{m.group(1)}" if m else source
        raise PolicyError(f"not valid TOML: {e}", where) from None
    except RecursionError:
        m = re.search(r"(?:[\[{]\s*){30,}", text)
        line = text.count("\n", 0, m.start()) + 1 if m else None
        raise PolicyError("arrays or tables nested too deeply", f"{source}:{line}" if line else source) from None
    except ValueError as e:       # e.g. an integer of more than 4300 digits
        m = re.search(r"\d{100,}", text)
        line = text.count("\n", 0, m.start()) + 1 if m else None
        raise PolicyError(f"not a usable TOML value: {e}".split(";")[0],
                          f"{source}:{line}" if line else source) from None


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    if not isinstance(text, str):
        raise PolicyError("policy text must be a str", source)
    doc = _toml(text, source)
    L = _Lines(text, source)
    for k in doc:
        if k not in TOP_KEYS:
            raise PolicyError(f"unknown table or key {_short(k)!r}; expected {sorted(TOP_KEYS)}",
                              L.where(L.tables.get(k, 1), _short(k)))
    hl = L.tables.get("policy", 1)
    head = _table(doc.get("policy", {}), L, hl, "policy")
    _only(head, POLICY_KEYS, L, hl, "[policy]")
    default = _choice(head.get("default", "deny"), ("allow", "deny"), L, L.key(hl, "default"), "policy.default")
    default_log = _bool(head.get("log", True), L, L.key(hl, "log"), "policy.log")
    x2apic = _choice(head.get("x2apic", "error"), ("error", "warn"), L, L.key(hl, "x2apic"), "policy.x2apic")
    him = _choice(head.get("host_ignore_msrs", "error"), ("error", "warn"), L,
                  L.key(hl, "host_ignore_msrs"), "policy.host_ignore_msrs")
    rate = _rate(head.get("audit_rate", 20.0), L, L.key(hl, "audit_rate"), "policy.audit_rate")
    burst = _int(head.get("audit_burst", 20), 1, 1 << 20, L, L.key(hl, "audit_burst"), "policy.audit_burst")
    audit_failure = _choice(head.get("audit_failure", "stop"), ("stop", "warn"), L,
                            L.key(hl, "audit_failure"), "policy.audit_failure")
    mode = _choice(head.get("mode", "enforce"), ("enforce", "audit"), L, L.key(hl, "mode"), "policy.mode")
    name = head.get("name", Path(source).stem)
    if not isinstance(name, str) or len(name) > MAX_NAME:
        raise PolicyError(f"must be a string of at most {MAX_NAME} characters",
                          L.where(L.key(hl, "name"), "policy.name"))
    rules_doc = doc.get("rule", [])
    if not isinstance(rules_doc, list):
        raise PolicyError("write rules as [[rule]] tables", L.where(L.tables.get("rule", 1), "rule"))
    rules = []
    for n, rd in enumerate(rules_doc):
        line = L.rule_starts[n] if n < len(L.rule_starts) else L.tables.get("rule", 1)
        rd = _table(rd, L, line, f"rule {n + 1}")
        rules.extend(_rule(rd, n + 1, line, L, default_log))
    return Policy(name=name, default=default, default_log=default_log, rules=rules,
                  unknown=_failure(doc.get("unknown", {}), "unknown", L),
                  invalid=_failure(doc.get("invalid", {}), "invalid", L),
                  x2apic=x2apic, host_ignore_msrs=him, audit_rate=rate, audit_burst=burst,
                  audit_failure=audit_failure, mode=mode, source=source)


def _table(d, L: _Lines, line: int, what: str) -> dict:
    if not isinstance(d, dict):
        raise PolicyError(f"must be a table, not {_kind(d)}", L.where(line, what))
    return d


def _kind(x) -> str:
    return {bool: "true/false", int: "a number", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(x), type(x).__name__)


def _short(x, n: int = 40) -> str:
    s = x if isinstance(x, str) else repr(x)
    return s if len(s) <= n else s[:n] + "..."


def _rate(x, L: _Lines, line: int, field: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or \
            (isinstance(x, int) and x.bit_length() > 64) or not math.isfinite(x) or \
            not 0 < x <= MAX_AUDIT_RATE:
        raise PolicyError(f"{_short(x)}: must be a finite number of records per second in "
                          f"(0, {MAX_AUDIT_RATE:g}]", L.where(line, field))
    return float(x)


def _failure(d, name: str, L: _Lines) -> FailureRule:
    line = L.tables.get(name, 1)
    d = _table(d, L, line, name)
    _only(d, FAILURE_KEYS, L, line, f"[{name}]")
    action = _choice(d.get("action", "gp"), FAILURE_ACTIONS, L, L.key(line, "action"), f"{name}.action")
    return FailureRule(FailureAction(action), _bool(d.get("log", False), L, L.key(line, "log"), f"{name}.log"))


def _rule(d: dict, n: int, line: int, L: _Lines, default_log: bool) -> list[Rule]:
    what = f"rule {n}"
    _only(d, RULE_KEYS, L, line, what)
    at = lambda key: L.key(line, key)
    spans = []   # (lo, hi, label)
    given = [k for k in ("msr", "msrs", "range") if k in d]
    if len(given) != 1:
        raise PolicyError("give exactly one of msr = NAME|INDEX, msrs = [...], range = [FIRST, LAST]"
                          + (f" (found {', '.join(given)})" if given else ""), L.where(line, what))
    if "msr" in d:
        i = _msr(d["msr"], L, at("msr"), f"{what}.msr")
        spans.append((i, i, _label(d["msr"])))
    elif "msrs" in d:
        if not isinstance(d["msrs"], list) or not d["msrs"]:
            raise PolicyError("must be a non-empty list of MSR names or indices", L.where(at("msrs"), f"{what}.msrs"))
        for x in d["msrs"]:
            i = _msr(x, L, at("msrs"), f"{what}.msrs")
            spans.append((i, i, _label(x)))
    else:
        r = d["range"]
        if not isinstance(r, list) or len(r) != 2:
            raise PolicyError("must be [FIRST, LAST] (inclusive)", L.where(at("range"), f"{what}.range"))
        lo, hi = (_msr(x, L, at("range"), f"{what}.range") for x in r)
        if hi < lo:
            raise PolicyError(f"FIRST {lo:#x} is above LAST {hi:#x}", L.where(at("range"), f"{what}.range"))
        spans.append((lo, hi, f"{_label(r[0])}..{_label(r[1])}"))
    access = d.get("access", "both")
    if not isinstance(access, str) or access not in ACCESS_WORDS:
        raise PolicyError(f"{_short(access)!r} is not one of read, write, both",
                          L.where(at("access"), f"{what}.access"))
    if "action" not in d:
        raise PolicyError(f"missing; one of {', '.join(ACTIONS)}", L.where(line, f"{what}.action"))
    action = RuleAction(_choice(d["action"], ACTIONS, L, at("action"), f"{what}.action"))
    log = _bool(d.get("log", default_log if action is not RuleAction.ALLOW else False), L, at("log"), f"{what}.log")
    if "comment" in d and not isinstance(d["comment"], str):
        raise PolicyError("must be a string", L.where(at("comment"), f"{what}.comment"))
    opts = {}
    allowed_keys = {RuleAction.CONSTANT: {"value", "writes"},
                    RuleAction.EMULATE: {"initial", "write_mask", "allowed"}}.get(action, set())
    for k in ("value", "writes", "initial", "write_mask", "allowed"):
        if k in d and k not in allowed_keys:
            raise PolicyError(f"{k!r} has no meaning for action {action.value!r}", L.where(at(k), f"{what}.{k}"))
    if action is RuleAction.CONSTANT:
        if "value" not in d:
            raise PolicyError("action 'constant' needs value = N", L.where(line, f"{what}.value"))
        opts["value"] = _int(d["value"], 0, U64, L, at("value"), f"{what}.value")
        opts["writes"] = _choice(d.get("writes", "ignore"), ("ignore", "gp"), L, at("writes"), f"{what}.writes")
    if action is RuleAction.EMULATE:
        opts["initial"] = _int(d.get("initial", 0), 0, U64, L, at("initial"), f"{what}.initial")
        opts["write_mask"] = _int(d.get("write_mask", U64), 0, U64, L, at("write_mask"), f"{what}.write_mask")
        if "allowed" in d:
            if not isinstance(d["allowed"], list) or not d["allowed"]:
                raise PolicyError("must be a non-empty list of values", L.where(at("allowed"), f"{what}.allowed"))
            opts["allowed"] = tuple(_int(v, 0, U64, L, at("allowed"), f"{what}.allowed") for v in d["allowed"])
    where = f"{L.source}:{line} (rule {n})"
    return [Rule(lo, hi, ACCESS_WORDS[access], action, log, where, label=label, **opts)
            for lo, hi, label in spans]


def _label(x) -> str:
    return x if isinstance(x, str) else f"{x:#x}" if isinstance(x, int) else str(x)


def _msr(x, L: _Lines, line: int, field: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, str)):
        raise PolicyError(f"{_short(x)}: give an MSR name or index", L.where(line, field))
    if isinstance(x, int):
        i = x
    elif len(x) > MAX_NAME:
        raise PolicyError(f"{_short(x)!r} is not an MSR name or index", L.where(line, field))
    else:
        i = names.msr_index(x)
        if i is None:
            hint = names.suggest(x)
            raise PolicyError(f"unknown MSR {x!r}" + (f"; did you mean {', '.join(hint)}?" if hint else
                              "; use its index, e.g. 0x10"), L.where(line, field))
    if not 0 <= i <= U32:
        raise PolicyError(f"MSR index {_hex(i)} is outside 0..0xffffffff", L.where(line, field))
    return i


def _hex(x: int) -> str:
    return f"{x:#x}" if x.bit_length() <= 128 else f"{'-' if x < 0 else ''}a {x.bit_length()}-bit number"


def _int(x, lo: int, hi: int, L: _Lines, line: int, field: str) -> int:
    if isinstance(x, str):
        text = x
        try:
            x = int(text, 0) if len(text) <= 100 else None
        except ValueError:
            x = None
        if x is None:
            raise PolicyError(f"{_short(text)!r} is not a number", L.where(line, field))
    if isinstance(x, bool) or not isinstance(x, int):
        raise PolicyError(f"{_short(x)} is not an integer", L.where(line, field))
    if not lo <= x <= hi:
        raise PolicyError(f"{_hex(x)} is outside {lo:#x}..{hi:#x}", L.where(line, field))
    return x


def _bool(x, L: _Lines, line: int, field: str) -> bool:
    if not isinstance(x, bool):
        raise PolicyError(f"{_short(x)!r} is not true or false", L.where(line, field))
    return x


def _choice(x, options, L: _Lines, line: int, field: str) -> str:
    if not isinstance(x, str) or x not in options:
        raise PolicyError(f"{_short(x)!r} is not one of {', '.join(options)}", L.where(line, field))
    return x


def _only(d: dict, keys: set, L: _Lines, line: int, what: str) -> None:
    for k in d:
        if k not in keys:
            raise PolicyError(f"unknown key {_short(k)!r}; expected one of {', '.join(sorted(keys))}",
                              L.where(L.key(line, k), f"{what}.{_short(k)}"))
