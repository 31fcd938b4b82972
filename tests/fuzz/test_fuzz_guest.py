"""Fuzzing the guest file boundary: arbitrary bytes as assembly (.S) and as flat binaries (.bin),
and structured mutations of real guest programs, through kvmgate.guest.load_guest (read, suffix,
size, ASCII, GNU as + ld under limits).  The only allowed outcomes are machine code that fits
below the data area, or the project's own UserError in one line naming the file.  Fixed seed; a
small budget in CI, >= 50,000 inputs per kind with KVMGATE_SLOW=1 (each mutation that reaches
the assembler costs an `as` and an `ld` run: about 20-80 ms; KVMGATE_FUZZ_EXAMPLES=N sets
another count)."""
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmgate.errors import UserError
from kvmgate.guest import MAX_PROGRAM, load_guest

SLOW = os.environ.get("KVMGATE_SLOW") == "1"
EXAMPLES = int(os.environ.get("KVMGATE_FUZZ_EXAMPLES", 50_000 if SLOW else 60))
SUMMARY_LINES: list[str] = []
pytestmark = pytest.mark.timeout(0 if SLOW else 300)     # slow mode runs for many minutes
COUNTS = {kind: {"inputs": 0, "accepted": 0, "refused": 0}
          for kind in ("bytes as .S", "bytes as .bin", "mutations")}

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = [
    (ROOT / "kvmgate" / "examples" / "probe.S").read_text(),
    "again:\n    mov ecx, 0x35\n    rdmsr\n    cmp eax, 2\n    jne again\n    hlt\n",
    "    mov r13, [0x100000]   ; absolute\n    lea rax, [rip + data]\n    out 0x80, al\n    hlt\n"
    "data: .quad 0x1234\n",
]
PIECES = ["mov eax, 1", "rdmsr", "wrmsr", "hlt", "jmp again", "again:", "lbl:", ".quad 1", ".byte 0xff",
          ".space 16", ".space 0x7fffffff", ".align 0x40000000", ".align 16", ".org 0x10", ".org -1",
          ".rept 3", ".endr", ".macro m", ".endm", ".incbin \"/etc/passwd\"", ".include \"/dev/zero\"",
          "mov rax, [0x100000]", "mov [rax], rbx", "push 13", "out dx, al", "; comment", "# comment",
          "db 0x90", ".ascii \"a;b\"", ".fill 0x100000, 1, 0x90", "mov ecx, 0xc0000082", ".intel_syntax",
          ".att_syntax", "movl $1, %eax", ".code32", ".section .data", ".bss", ".global x", "x = 5",
          "\t", "", "é", "\x00", "\x7f"]


def check(kind: str, path: Path) -> None:
    COUNTS[kind]["inputs"] += 1
    try:
        code = load_guest(path)
    except UserError as e:
        COUNTS[kind]["refused"] += 1
        text = str(e)
        assert text.startswith(str(path)) and "\n" not in text and len(text) < 1000, text
    else:
        COUNTS[kind]["accepted"] += 1
        assert isinstance(code, bytes) and 0 < len(code) <= MAX_PROGRAM


def write(tmp_path_factory, name: str, data: bytes) -> Path:
    p = tmp_path_factory.getbasetemp() / name
    p.write_bytes(data)
    return p


@st.composite
def mutated(draw) -> bytes:
    lines = draw(st.sampled_from(PROGRAMS)).splitlines()
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["insert", "replace", "delete", "bytes"]))
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        if op == "insert":
            lines.insert(i, draw(st.sampled_from(PIECES)))
        elif op == "replace" and lines:
            lines[i] = draw(st.sampled_from(PIECES))
        elif op == "delete" and lines:
            del lines[i]
        elif op == "bytes" and lines:
            line = lines[i].encode()
            at = draw(st.integers(0, len(line)))
            lines[i] = (line[:at] + draw(st.binary(max_size=3)) + line[at:]).decode("latin-1")
    return "\n".join(lines).encode("latin-1", "replace")


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None)
@given(st.binary(max_size=256) | st.text(alphabet=st.characters(max_codepoint=0x7f), max_size=120).map(str.encode))
def test_arbitrary_bytes_as_source(tmp_path_factory, data):
    check("bytes as .S", write(tmp_path_factory, "fuzz.S", data))


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None)
@given(st.binary(max_size=256) | st.integers(MAX_PROGRAM - 2, MAX_PROGRAM + 2).map(lambda n: b"\x90" * n))
def test_arbitrary_bytes_as_binary(tmp_path_factory, data):
    check("bytes as .bin", write(tmp_path_factory, "fuzz.bin", data))


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None)
@given(mutated())
def test_structured_mutations(tmp_path_factory, data):
    check("mutations", write(tmp_path_factory, "fuzz.S", data))


def test_programs_load_and_summary(tmp_path_factory):
    for n, prog in enumerate(PROGRAMS):
        assert load_guest(write(tmp_path_factory, f"seed{n}.S", prog.encode()))
    for kind, c in COUNTS.items():
        SUMMARY_LINES.append(f"fuzz guest ({kind}): {c['inputs']} inputs, {c['accepted']} loaded, "
                             f"{c['refused']} refused with the project's error, 0 escapes")
