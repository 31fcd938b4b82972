"""Assemble 64-bit Intel-syntax guest programs with the Keystone assembler."""
from __future__ import annotations

import functools

from .errors import UserError


class AsmError(UserError):
    """The guest program does not assemble."""


@functools.lru_cache(maxsize=1)
def _keystone():
    import keystone
    return keystone, keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64)


@functools.lru_cache(maxsize=256)
def assemble(source: str, address: int) -> bytes:
    """Machine code for `source` placed at guest address `address` (labels resolve there)."""
    ks_mod, ks = _keystone()
    try:
        code, _count = ks.asm(source, address)
    except ks_mod.KsError as e:
        raise AsmError(f"cannot assemble guest program: {e}", where=_guess_line(source, ks)) from None
    if code is None:
        raise AsmError("guest program assembled to nothing")
    return bytes(code)


def _guess_line(source: str, ks) -> str | None:
    """Find the first line that does not assemble on its own (labels stripped), for the message."""
    for no, line in enumerate(source.splitlines(), 1):
        text = line.split(";")[0].strip()
        if not text or text.endswith(":") or text.startswith("."):
            continue
        if ":" in text:
            text = text.split(":", 1)[1].strip()
        try:
            ks.asm(text, 0)
        except Exception:
            return f"line {no}: {line.strip()!r}"
    return None
