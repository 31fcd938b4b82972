"""JSON Schemas (draft 2020-12) for what kvmgate reads and writes, shipped as package data:
`audit` (one audit log record; every record carries `"schema": 1`), `policy` (a policy
file's parsed TOML) and `kvm-filter` (`kvmgate policy export --format kvm-filter-json`, see
docs/kvm-msr.md §7).  `kvmgate schema audit|policy|kvm-filter` prints them."""
from __future__ import annotations

import json
from importlib import resources

SCHEMAS = ("audit", "policy", "kvm-filter")


def schema_text(name: str) -> str:
    """The schema document `name` (one of SCHEMAS) as JSON text."""
    if name not in SCHEMAS:
        raise KeyError(name)
    return resources.files(__package__).joinpath(f"{name}.schema.json").read_text(encoding="utf-8")


def schema(name: str) -> dict:
    """The schema document `name` parsed."""
    return json.loads(schema_text(name))
