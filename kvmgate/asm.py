"""Assemble 64-bit Intel-syntax guest programs with GNU as (binutils) into a flat binary.

`as --64` reads `.intel_syntax noprefix` + `.code64` and the program; `ld` places everything at
the load address (so labels and absolute references resolve there) and writes a flat binary.
GNU as encodes a register-free operand `[0x100000]` as an absolute address, as written.

`;` starts a comment, as kvmgate has always documented (GNU as would take it as a statement
separator): everything from a `;` outside a string to the end of the line is dropped before
assembly.  `#` comments work too (GNU as's own).  `.include` and `.incbin` are refused: a guest
program is one self-contained file, and the assembler reads no other.

Both tools run as children with a wall-clock timeout and RLIMIT_FSIZE / RLIMIT_CPU / RLIMIT_AS,
so `.space 0x7fffffff` or `.align 0x40000000` is refused in milliseconds instead of filling the
disk; the binary is then checked against the size the caller allows.  Errors are AsmError naming
the program's file and line (exit 2 in the CLI)."""
from __future__ import annotations

import functools
import os
import re
import resource
import shutil
import subprocess
import tempfile

from .errors import AsmError

__all__ = ["AsmError", "assemble", "strip_comments", "MAX_OUTPUT", "TIMEOUT"]

MAX_OUTPUT = 16 << 20        # bytes any intermediate file may have (RLIMIT_FSIZE of as and ld)
MAX_MEMORY = 1 << 30         # RLIMIT_AS of as and ld
TIMEOUT = 20.0               # seconds of wall clock per tool
MAX_SOURCE = 4 << 20         # characters of program text

HEADER = ".intel_syntax noprefix\n.code64\n.text\n"
_LINKER_SCRIPT = """SECTIONS {{
  . = {address:#x};
  .text : {{ *(.text .text.*) *(.rodata .rodata.*) *(.data .data.*) *(.bss .bss.*) *(COMMON) }}
  /DISCARD/ : {{ *(*) }}
}}
"""
_FILE_DIRECTIVE = re.compile(r"^\s*(?:[A-Za-z_.$][\w.$]*:\s*)*\.(include|incbin)\b", re.IGNORECASE | re.MULTILINE)
_DIAG = re.compile(r"^prog\.s:(\d+): (Error|Warning|Fatal error): (.*)$")


def strip_comments(source: str) -> str:
    """Drop `;` comments (NASM style) outside double-quoted strings; line numbers are kept."""
    out = []
    for line in source.split("\n"):
        if ";" in line:
            quoted = False
            for i, ch in enumerate(line):
                if ch == '"' and (i == 0 or line[i - 1] != "\\"):
                    quoted = not quoted
                elif ch == ";" and not quoted:
                    line = line[:i]
                    break
        out.append(line)
    return "\n".join(out)


def _limits() -> None:       # in the child, before exec
    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_OUTPUT, MAX_OUTPUT))
    resource.setrlimit(resource.RLIMIT_AS, (MAX_MEMORY, MAX_MEMORY))
    resource.setrlimit(resource.RLIMIT_CPU, (int(TIMEOUT), int(TIMEOUT) + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@functools.lru_cache(maxsize=1)
def _tools() -> tuple[str, str]:
    tools = (shutil.which("as"), shutil.which("ld"))
    if None in tools:
        raise AsmError("GNU as and ld (binutils) are needed to assemble guest programs: "
                       "install binutils, or give the guest as a flat binary (.bin)")
    return tools


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[:n] + "..."


def _run(argv: list[str], name: str, what: str, cwd: str, source: str) -> str:
    try:
        p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, errors="replace",
                           timeout=TIMEOUT, preexec_fn=_limits, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise AsmError(f"{what} took more than {TIMEOUT:g} s; refused", name) from None
    if p.returncode < 0:
        raise AsmError(f"{what} was stopped by signal {-p.returncode} (output over "
                       f"{MAX_OUTPUT} bytes, memory or CPU limit): the program asks for too much",
                       name)
    if p.returncode:
        _raise_diagnostic(p.stderr, name, what, source)
    return p.stderr


def _raise_diagnostic(stderr: str, name: str, what: str, source: str):
    for line in stderr.splitlines():
        m = _DIAG.match(line)
        if m and m.group(2) != "Warning":
            no = int(m.group(1))
            lines = source.split("\n")
            text = lines[no - 1].strip() if 0 < no <= len(lines) else ""
            raise AsmError(f"cannot assemble line {no}" + (f" ({_short(text)!r})" if text else "")
                           + f": {m.group(3).strip()}", f"{name}:{no}")
    lines = [l for l in stderr.splitlines() if l.strip() and "Assembler messages" not in l]
    if any("File size limit" in l or "file truncated" in l or "No space" in l for l in lines):
        raise AsmError(f"{what}: output over {MAX_OUTPUT} bytes: the program asks for too much", name)
    raise AsmError(f"{what} failed: {lines[-1].strip() if lines else 'no message'}", name)


def _first_non_ascii(source: str) -> tuple[int, int, str] | None:
    for no, line in enumerate(source.split("\n"), 1):
        for col, ch in enumerate(line, 1):
            if ord(ch) > 0x7E or (ord(ch) < 0x20 and ch not in "\t\r\f\v"):
                return no, col, ch
    return None


@functools.lru_cache(maxsize=256)
def assemble(source: str, address: int, name: str = "<guest program>",
             limit: int = MAX_OUTPUT) -> bytes:
    """Machine code for `source` placed at guest address `address` (labels resolve there), at
    most `limit` bytes.  AsmError naming `name` and the line on any failure."""
    if not isinstance(source, str):
        raise AsmError("a guest program is text (or bytes for a flat binary)", name)
    if len(source) > MAX_SOURCE:
        raise AsmError(f"program text is {len(source)} characters; at most {MAX_SOURCE}", name)
    bad = _first_non_ascii(source)
    if bad is not None:
        no, col, ch = bad
        raise AsmError(f"character {ch!r} (U+{ord(ch):04X}) at column {col}: guest programs are "
                       "ASCII", f"{name}:{no}")
    text = strip_comments(source)
    m = _FILE_DIRECTIVE.search(text)
    if m:
        no = text.count("\n", 0, m.start()) + 1
        raise AsmError(f".{m.group(1).lower()} reads another file: guest programs are one "
                       "self-contained file", f"{name}:{no}")
    as_, ld = _tools()
    with tempfile.TemporaryDirectory(prefix="kvmgate-asm-") as tmp:
        with open(os.path.join(tmp, "header.s"), "w") as f:
            f.write(HEADER)
        with open(os.path.join(tmp, "prog.s"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(tmp, "link.ld"), "w") as f:
            f.write(_LINKER_SCRIPT.format(address=address))
        _run([as_, "--64", "-o", "prog.o", "header.s", "prog.s"], name, "GNU as", tmp, source)
        _run([ld, "-m", "elf_x86_64", "-T", "link.ld", "--oformat", "binary", "-o", "prog.bin",
              "prog.o"], name, "ld", tmp, source)
        out = os.path.join(tmp, "prog.bin")
        size = os.path.getsize(out)
        if size > limit:
            raise AsmError(f"program assembles to {size} bytes; at most {limit} fit", name)
        with open(out, "rb") as f:
            code = f.read()
    if not code:
        raise AsmError("guest program assembled to nothing", name)
    return code
