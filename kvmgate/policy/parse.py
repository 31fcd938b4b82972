"""Parse a TOML policy (stdlib tomllib) into a Policy; every error names file, line and field."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from ..errors import PolicyError
from ..msr import names
from ..uapi import U32, U64
from .model import ACCESS_WORDS, ACTIONS, FAILURE_ACTIONS, FailureRule, Policy, Rule

TOP_KEYS = {"policy", "rule", "unknown", "invalid"}
POLICY_KEYS = {"name", "default", "log", "x2apic", "host_ignore_msrs", "audit_rate", "audit_burst",
               "audit_failure"}
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
        self.tables = {m.group(1): i + 1 for i, l in enumerate(self.lines)
                       for m in [re.match(r"\s*\[\s*([A-Za-z_]+)\s*\]\s*(#.*)?$", l)] if m}

    def key(self, start: int, key: str) -> int:
        for i in range(start, len(self.lines) + 1):
            if i > start and re.match(r"\s*\[", self.lines[i - 1]):
                break
            if re.match(rf"\s*{re.escape(key)}\s*=", self.lines[i - 1]):
                return i
        return start

    def where(self, line: int, what: str) -> str:
        return f"{self.source}:{line}: {what}"


def load_policy(path: str | Path) -> Policy:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise PolicyError(f"cannot read policy: {e.strerror}", str(p)) from None
    return parse_policy(text, str(p))


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        where = f"{source}:{m.group(1)}" if m else source
        raise PolicyError(f"not valid TOML: {e}", where) from None
    L = _Lines(text, source)
    for k in doc:
        if k not in TOP_KEYS:
            raise PolicyError(f"unknown table or key {k!r}; expected {sorted(TOP_KEYS)}",
                              L.where(L.tables.get(k, 1), k))
    head = doc.get("policy", {})
    hl = L.tables.get("policy", 1)
    _only(head, POLICY_KEYS, L, hl, "[policy]")
    default = _choice(head.get("default", "deny"), ("allow", "deny"), L, L.key(hl, "default"), "policy.default")
    default_log = _bool(head.get("log", True), L, L.key(hl, "log"), "policy.log")
    x2apic = _choice(head.get("x2apic", "error"), ("error", "warn"), L, L.key(hl, "x2apic"), "policy.x2apic")
    him = _choice(head.get("host_ignore_msrs", "error"), ("error", "warn"), L,
                  L.key(hl, "host_ignore_msrs"), "policy.host_ignore_msrs")
    rate = head.get("audit_rate", 20.0)
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or rate <= 0:
        raise PolicyError("must be a positive number of records per second",
                          L.where(L.key(hl, "audit_rate"), "policy.audit_rate"))
    burst = _int(head.get("audit_burst", 20), 1, 1 << 20, L, L.key(hl, "audit_burst"), "policy.audit_burst")
    audit_failure = _choice(head.get("audit_failure", "stop"), ("stop", "warn"), L,
                            L.key(hl, "audit_failure"), "policy.audit_failure")
    name = head.get("name", Path(source).stem)
    if not isinstance(name, str):
        raise PolicyError("must be a string", L.where(L.key(hl, "name"), "policy.name"))
    rules_doc = doc.get("rule", [])
    if not isinstance(rules_doc, list):
        raise PolicyError("write rules as [[rule]] tables", L.where(L.tables.get("rule", 1), "rule"))
    rules = []
    for n, rd in enumerate(rules_doc):
        line = L.rule_starts[n] if n < len(L.rule_starts) else 1
        rules.extend(_rule(rd, n + 1, line, L, default_log))
    return Policy(name=name, default=default, default_log=default_log, rules=rules,
                  unknown=_failure(doc.get("unknown", {}), "unknown", L),
                  invalid=_failure(doc.get("invalid", {}), "invalid", L),
                  x2apic=x2apic, host_ignore_msrs=him, audit_rate=float(rate), audit_burst=burst,
                  audit_failure=audit_failure, source=source)


def _failure(d, name: str, L: _Lines) -> FailureRule:
    line = L.tables.get(name, 1)
    if not isinstance(d, dict):
        raise PolicyError("must be a table", L.where(line, name))
    _only(d, FAILURE_KEYS, L, line, f"[{name}]")
    return FailureRule(_choice(d.get("action", "gp"), FAILURE_ACTIONS, L, L.key(line, "action"), f"{name}.action"),
                       _bool(d.get("log", False), L, L.key(line, "log"), f"{name}.log"))


def _rule(d: dict, n: int, line: int, L: _Lines, default_log: bool) -> list[Rule]:
    what = f"rule {n}"
    _only(d, RULE_KEYS, L, line, what)
    at = lambda key: L.key(line, key)
    spans = []   # (lo, hi, label, line)
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
    if access not in ACCESS_WORDS:
        raise PolicyError(f"{access!r} is not one of read, write, both", L.where(at("access"), f"{what}.access"))
    if "action" not in d:
        raise PolicyError(f"missing; one of {', '.join(ACTIONS)}", L.where(line, f"{what}.action"))
    action = _choice(d["action"], ACTIONS, L, at("action"), f"{what}.action")
    log = _bool(d.get("log", default_log if action != "allow" else False), L, at("log"), f"{what}.log")
    opts = {}
    allowed_keys = {"allow": set(), "deny": set(), "ignore": set(), "constant": {"value", "writes"},
                    "emulate": {"initial", "write_mask", "allowed"}}[action]
    for k in ("value", "writes", "initial", "write_mask", "allowed"):
        if k in d and k not in allowed_keys:
            raise PolicyError(f"{k!r} has no meaning for action {action!r}", L.where(at(k), f"{what}.{k}"))
    if action == "constant":
        if "value" not in d:
            raise PolicyError("action 'constant' needs value = N", L.where(line, f"{what}.value"))
        opts["value"] = _int(d["value"], 0, U64, L, at("value"), f"{what}.value")
        opts["writes"] = _choice(d.get("writes", "ignore"), ("ignore", "gp"), L, at("writes"), f"{what}.writes")
    if action == "emulate":
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
        raise PolicyError(f"{x!r}: give an MSR name or index", L.where(line, field))
    if isinstance(x, int):
        i = x
    else:
        i = names.msr_index(x)
        if i is None:
            hint = names.suggest(x)
            raise PolicyError(f"unknown MSR {x!r}" + (f"; did you mean {', '.join(hint)}?" if hint else
                              "; use its index, e.g. 0x10"), L.where(line, field))
    if not 0 <= i <= U32:
        raise PolicyError(f"MSR index {i:#x} is outside 0..0xffffffff", L.where(line, field))
    return i


def _int(x, lo: int, hi: int, L: _Lines, line: int, field: str) -> int:
    if isinstance(x, str):
        try:
            x = int(x, 0)
        except ValueError:
            raise PolicyError(f"{x!r} is not a number", L.where(line, field)) from None
    if isinstance(x, bool) or not isinstance(x, int):
        raise PolicyError(f"{x!r} is not an integer", L.where(line, field))
    if not lo <= x <= hi:
        raise PolicyError(f"{x:#x} is outside {lo:#x}..{hi:#x}", L.where(line, field))
    return x


def _bool(x, L: _Lines, line: int, field: str) -> bool:
    if not isinstance(x, bool):
        raise PolicyError(f"{x!r} is not true or false", L.where(line, field))
    return x


def _choice(x, options, L: _Lines, line: int, field: str) -> str:
    if x not in options:
        raise PolicyError(f"{x!r} is not one of {', '.join(options)}", L.where(line, field))
    return x


def _only(d: dict, keys: set, L: _Lines, line: int, what: str) -> None:
    for k in d:
        if k not in keys:
            raise PolicyError(f"unknown key {k!r}; expected one of {', '.join(sorted(keys))}",
                              L.where(L.key(line, k), f"{what}.{k}"))
