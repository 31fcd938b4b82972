"""`kvmgate schema audit|policy|kvm-filter`: print a shipped JSON Schema."""
from __future__ import annotations

from ..schemas import SCHEMAS, schema_text


def cmd_schema(a) -> int:
    print(schema_text(a.name), end="")
    return 0


def register(sub) -> None:
    p = sub.add_parser("schema", help="print the JSON Schema of audit records, policy files or exported KVM filters")
    p.add_argument("name", choices=SCHEMAS)
    p.set_defaults(fn=cmd_schema)
