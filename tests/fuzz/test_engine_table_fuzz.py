"""Arbitrary bytes into the engine's table validator (a shim must fail closed on a bad table)
and the ring attach check: rejected with ValueError, or accepted and then decided safely.
(csrc/test_engine.c does the same under AddressSanitizer.)"""
import mmap
import struct
import zlib

import pytest
from hypothesis import given, settings, strategies as st

from kvmgate.engine import Ring, build_table
from kvmgate.engine.binding import native
from kvmgate.engine.table import CHECKSUM_AT

from ..engine_policies import policies, require_engine

@pytest.fixture(autouse=True)
def _engine_built():
    require_engine()


def _decide_all(table: bytes):
    try:
        eng = native().Engine(table)
    except ValueError:
        return False
    for index in (0, 0x10, 0x35, 0x186, 0xC0000082, 0xFFFFFFFF):
        for write in (False, True):
            for reason in (0, 1, 2, 4, 8):
                res, _v, action, _r, _f = eng.decide(index, write, reason, 0x5)
                assert 1 <= res <= 5 and 0 <= action <= 5
    return True


@given(st.binary(max_size=600))
def test_random_bytes(data):
    code = native().validate(data)
    assert code <= 0
    assert (code == 0) == _decide_all(data)


@settings(max_examples=300)
@given(policies(), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
       st.booleans(), st.sampled_from([None, "cut", "grow"]))
def test_mutated_tables(cp, flips, fix_checksum, resize):
    b = bytearray(build_table(cp).data)
    for at, x in flips:
        b[at % len(b)] ^= x
    if resize == "cut":
        del b[len(b) // 2:]
    elif resize == "grow":
        b += b"\x00" * 24
    if fix_checksum and len(b) >= 64:
        struct.pack_into("<I", b, CHECKSUM_AT, 0)
        struct.pack_into("<I", b, CHECKSUM_AT, zlib.crc32(b))
    code = native().validate(bytes(b))
    assert (code == 0) == _decide_all(bytes(b))
    if not flips and resize is None:
        assert code == 0


@given(st.binary(min_size=0, max_size=400))
def test_ring_attach_checks_the_header(data):
    buf = mmap.mmap(-1, max(len(data), 1))
    buf[:len(data)] = data
    try:
        r = Ring(buffer=buf)
    except ValueError:
        return
    r.drain(())
