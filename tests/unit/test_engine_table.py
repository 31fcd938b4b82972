"""The engine table builder (kvmgate/engine/table.py) and the C validator's verdict on it."""
import struct
import zlib

import pytest

from kvmgate.engine import EngineTableError, build_table, read_table
from kvmgate.engine.binding import native
from kvmgate.engine.table import CHECKSUM_AT, KINDS, MAX_EMULATED, NONE
from kvmgate.policy import compile_policy, parse_policy

from ..engine_policies import require_engine

POLICY = """
[policy]
name = "t"
default = "deny"
log = true
[[rule]]
range = [0x186, 0x189]
action = "ignore"
log = false
[[rule]]
msr = 0x18a
action = "ignore"
log = true
[[rule]]
msr = 0x35
access = "read"
action = "constant"
value = 0x10001
[[rule]]
msr = 0x36
action = "constant"
writes = "gp"
value = 7
[[rule]]
msr = 0xc0000082
access = "write"
action = "emulate"
allowed = [3, 1, 2, 1]
write_mask = 0xff
initial = 1
[[rule]]
msr = 0x10
action = "allow"
log = true
[unknown]
action = "ignore"
log = true
"""


def cp_of(text=POLICY):
    return compile_policy(parse_policy(text, "t.toml"))


def test_layout_round_trip():
    t = build_table(cp_of())
    v = read_table(t.data)
    kinds = {a[0] for a in v.actions}
    assert kinds == {KINDS[k] for k in ("deny", "ignore", "constant", "emulate", "forward")}
    # 0x186-0x189 (ignore, unlogged) merge into one span per direction; 0x18a (logged) is apart
    assert (0x186, 0x189) in [(lo, hi) for lo, hi, _ in v.reads]
    assert (0x186, 0x189) in [(lo, hi) for lo, hi, _ in v.writes]
    assert (0x18a, 0x18a) in [(lo, hi) for lo, hi, _ in v.reads]
    assert [s[:2] for s in v.reads] == sorted(s[:2] for s in v.reads)
    # reads of 0x35 only; writes of 0xc0000082 only
    assert any(lo == 0x35 for lo, _, _ in v.reads) and not any(lo == 0x35 for lo, _, _ in v.writes)
    assert any(lo == 0xC0000082 for lo, _, _ in v.writes)
    emu = next(a for a in v.actions if a[0] == KINDS["emulate"])
    assert emu[3] == 1 and emu[4] == 0xFF                      # initial, write_mask
    assert v.allowed[emu[5]:emu[5] + emu[6]] == (1, 2, 3)      # sorted, unique
    assert v.nemulate == 1
    assert t.rules[v.actions[v.default][2]] == "[policy] default"
    assert t.rules[v.actions[v.unknown][2]] == "[unknown]"
    assert v.invalid == NONE                                   # [invalid] gp unlogged: no action
    assert v.mode == 0 and build_table(cp_of(), "audit").data != t.data


def test_checksum_is_zlib_crc32_with_the_field_zeroed():
    data = bytearray(build_table(cp_of()).data)
    (crc,) = struct.unpack_from("<I", data, CHECKSUM_AT)
    struct.pack_into("<I", data, CHECKSUM_AT, 0)
    assert crc == zlib.crc32(data)


def test_identical_policies_give_identical_tables():
    assert build_table(cp_of()).data == build_table(cp_of()).data


def test_unknown_mode_is_refused():
    with pytest.raises(EngineTableError, match="mode 'strict'"):
        build_table(cp_of(), "strict")


def test_too_many_emulated_msrs_is_refused():
    text = f"""[policy]
name = "big"
default = "allow"
[[rule]]
range = [0x40000000, {0x40000000 + MAX_EMULATED:#x}]
action = "emulate"
"""
    with pytest.raises(EngineTableError, match=f"{MAX_EMULATED + 1} emulated MSRs"):
        build_table(cp_of(text))


def test_c_validator_accepts_built_tables_and_names_each_defect():
    require_engine()
    good = build_table(cp_of()).data
    assert native().validate(good) == 0

    def fixed(b: bytearray) -> bytes:
        struct.pack_into("<I", b, CHECKSUM_AT, 0)
        struct.pack_into("<I", b, CHECKSUM_AT, zlib.crc32(b))
        return bytes(b)

    def with_field(fmt, at, value, fix=True):
        b = bytearray(good)
        struct.pack_into(fmt, b, at, value)
        return fixed(b) if fix else bytes(b)

    v = read_table(good)
    spans_at = 64 + 48 * len(v.actions)
    cases = {
        -1: good[:40],                                       # shorter than a header
        -2: with_field("<I", 0, 0x12345678),                 # magic
        -3: with_field("<H", 4, 2),                          # version
        -4: with_field("<I", 8, len(good) - 8),              # size vs counts
        -5: with_field("<I", 20, 1, fix=False),              # checksum (mode changed, crc not)
        -6: with_field("<I", 16, 2),                         # mode
        -7: with_field("<B", 64, 9),                         # action kind
        -8: with_field("<I", spans_at + 8, 99),              # span action out of range
        -9: with_field("<I", 20, 77),                        # default action out of range
        -12: with_field("<I", 52, 1),                        # reserved header word
    }
    for code, table in cases.items():
        assert native().validate(table) == code, (code, native().strerror(code))
    # two spans swapped: unsorted
    b = bytearray(good)
    s0, s1 = b[spans_at:spans_at + 16], b[spans_at + 16:spans_at + 32]
    b[spans_at:spans_at + 32] = s1 + s0
    assert native().validate(fixed(b)) == -8
    # span boundaries, exactly: action == nactions is one past the end; a span that starts on
    # the previous span's last MSR overlaps it by one; starting one after it is fine
    assert native().validate(with_field("<I", spans_at + 8, len(v.actions))) == -8
    assert native().validate(with_field("<I", spans_at + 8, len(v.actions) - 1)) == 0
    (_lo0, hi0, _a0), (lo1, hi1, _a1) = v.reads[:2]
    assert hi0 + 1 < lo1 <= hi1                              # the layout the next lines assume
    assert native().validate(with_field("<I", spans_at + 16, hi0)) == -8
    assert native().validate(with_field("<I", spans_at + 16, hi0 + 1)) == 0
    # the allowed slice out of order
    b = bytearray(good)
    at = len(good) - 8 * len(v.allowed)
    struct.pack_into("<3Q", b, at, 3, 2, 1)
    assert native().validate(fixed(b)) == -10
    with pytest.raises(ValueError, match="checksum"):
        native().Engine(cases[-5])


def test_a_shared_registry_keeps_rule_ids_across_reloads():
    reg: list[str] = []
    first = build_table(cp_of(), registry=reg)
    n = len(first.rules)
    extra = '\n[[rule]]\nmsr = 0x3a\naccess = "read"\naction = "constant"\nvalue = 1\n'
    second = build_table(cp_of(POLICY + extra), registry=reg)
    assert len(second.rules) == n + 1 and second.rules[:n] == first.rules
    for a1 in read_table(first.data).actions:            # an old record decodes the same
        assert second.rules[a1[2]] == first.rules[a1[2]]
    alone = build_table(cp_of(POLICY + extra))
    assert set(alone.rules) == set(second.rules)
