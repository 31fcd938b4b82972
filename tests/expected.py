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


# ---- A second, deliberately plain reading of docs/kvm-msr.md §2 and §3 (not kvmgate's code):
# the oracle for the filter model's unit tests.  Written from the document, step by step.

EINVAL, OK = 22, 0
_U32 = 0xFFFFFFFF


def doc_errno(flt) -> int:
    """docs/kvm-msr.md §2, in order, plus what kvmgate adds before the ioctl (its docstring):
    more than 16 ranges, a field that is not a u32, a bitmap shorter than ceil(nmsrs / 8)."""
    def u32(x):
        return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= _U32

    ranges = list(flt.ranges)
    if len(ranges) > 16:
        return EINVAL
    if not u32(flt.flags) or flt.flags not in (0, 1):                     # step 1
        return EINVAL
    nonempty = [r for r in ranges if r.nmsrs != 0]                        # step 3: skip empties
    if flt.flags == 1 and not nonempty:                                   # step 2
        return EINVAL
    for r in nonempty:
        if not (u32(r.flags) and u32(r.base) and u32(r.nmsrs)):
            return EINVAL
        if r.flags not in (1, 2, 3):                                      # step 4
            return EINVAL
        if -(-r.nmsrs // 64) * 8 > 0x600:                                 # step 5
            return EINVAL
        if len(r.bitmap) * 8 < r.nmsrs:
            return EINVAL
    return OK                                                             # step 6: base unchecked


def doc_allows(flt, index: int, access: int) -> bool:
    """docs/kvm-msr.md §3: x2APIC never filtered; first non-empty range containing the index
    (32-bit end) with the access's direction decides by its bit; else the default."""
    if 0x800 <= index <= 0x8FF:
        return True
    for r in flt.ranges:
        if r.nmsrs == 0 or not (r.flags & access):
            continue
        end = (r.base + r.nmsrs) % (1 << 32)
        if r.base <= index and index < end:
            k = index - r.base
            bits = int.from_bytes(bytes(r.bitmap), "little")
            return (bits >> k) & 1 == 1
    return flt.flags != 1
