"""Assemble 64-bit Intel-syntax guest programs with the Keystone assembler."""
from __future__ import annotations

import functools
import re

from .errors import UserError


class AsmError(UserError):
    """The guest program does not assemble."""


@functools.lru_cache(maxsize=1)
def _keystone():
    import keystone
    return keystone, keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64)


_REGISTER = re.compile(
    r"\b([re]?[abcd]x|[abcd][lh]|[re]?(si|di|sp|bp)|(si|di|sp|bp)l|r(8|9|1[0-5])[dwb]?|[re]ip|[re]iz)\b",
    re.IGNORECASE)
_MEMORY = re.compile(r"\[([^\[\]]*)\]")


def absolute_operands(source: str) -> str:
    """Make register-free memory operands `[disp]` absolute, as GNU as does.

    Keystone 0.9.2 encodes them RIP-relative with the absolute value as displacement (so
    `mov r13, [0x100000]` at 0x10000 reads 0x110007); `[riz*1 + disp]` is the SIB absolute
    form.  `[rip + label]` stays RIP-relative."""
    def fix(m: re.Match) -> str:
        inner = m.group(1)
        return m.group(0) if _REGISTER.search(inner) else f"[riz*1 + {inner.strip()}]"
    return _MEMORY.sub(fix, source)


def strip_comments(source: str) -> str:
    """`;` starts a comment (NASM style); Keystone would take it as a statement separator."""
    return "\n".join(line.split(";", 1)[0] for line in source.splitlines())


@functools.lru_cache(maxsize=256)
def assemble(source: str, address: int) -> bytes:
    """Machine code for `source` placed at guest address `address` (labels resolve there)."""
    ks_mod, ks = _keystone()
    try:
        code, _count = ks.asm(absolute_operands(strip_comments(source)), address)
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
