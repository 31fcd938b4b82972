"""Expectations shared by several test modules."""
import json

# The audit records of kvmgate/examples/probe.S under kvmgate/examples/deny-by-default.toml:
# (msr, access, action, result), in guest order.
PROBE_AUDIT = [
    ("0x35", "read", "constant", "read 0x10001"),
    ("0xc0000082", "write", "emulate", "written"),
    ("0xc0000082", "write", "emulate", "#GP"),
    ("0x1a0", "read", "deny", "#GP"),
    ("0x12345678", "read", "deny", "#GP"),
]


def audit_decisions(jsonl: str) -> list[tuple]:
    """(msr, access, action, result) of every record in an audit log's text (a record that is
    not a decision, e.g. a suppression count, fails the caller's test with KeyError)."""
    recs = [json.loads(line) for line in jsonl.splitlines()]
    return [(x["msr"], x["access"], x["action"], x["result"]) for x in recs]
