"""Build a bootable QEMU image (multiboot v1) from a kvmgate guest program.

The image file is the runtime (runtime.S, assembled with GNU as and linked with ld at
layout.LOAD) padded up to kvmgate.guest.CODE, then the program, so that QEMU's multiboot loader
(hw/i386/multiboot.c, the header's load_addr/load_end_addr) puts the program at CODE as
Machine does.

The finish convention: a vCPU's program ends with `hlt` (Machine's HLT exit).  Under QEMU a
HLT with interrupts off never returns, so every `hlt` statement of the source is assembled as
the byte 0xd6 instead (SALC, undefined in 64-bit mode: #UD), and the runtime's #UD handler
takes the registers there.  Both are one byte, so every address, and so every #GP RIP, stays
the same.  (Not int3: on kvm_pvm hosts a guest INT3 ends QEMU with "KVM internal error ...
emulation failure".)  A program that executes 0xd6 itself would take #UD
under Machine; under QEMU it ends that vCPU.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from .. import guest
from ..asm import AsmError, assemble
from ..errors import UserError
from . import layout

HLT, FINISH = 0xF4, 0xD6

# one statement: optional labels, then the mnemonic; `;` or `#` starts a comment
_STATEMENT = re.compile(r"^(?P<lead>\s*(?:[A-Za-z_.$][\w.$]*:\s*)*)(?P<op>[A-Za-z][\w.]*)(?P<rest>.*)$")


class ImageError(UserError):
    """A guest program that cannot become an image (exit 2 naming the file and line)."""


def _split_comment(line: str) -> tuple[str, str]:
    cut = min((i for i in (line.find(";"), line.find("#")) if i >= 0), default=len(line))
    return line[:cut], line[cut:]


def finish_marked(source: str) -> tuple[str, int]:
    """The program with every `hlt` statement assembled as the FINISH byte, and how many."""
    out, count = [], 0
    for line in source.splitlines():
        code, comment = _split_comment(line)
        m = _STATEMENT.match(code)
        if m and m.group("op").lower() == "hlt" and not m.group("rest").strip():
            code = f"{m.group('lead')}.byte {FINISH:#x}{m.group('rest')}"
            count += 1
        out.append(code + comment)
    return "\n".join(out) + ("\n" if source.endswith("\n") else ""), count


def assemble_program(source: str, origin: str = "<program>") -> bytes:
    """The program's machine code at guest.CODE with the finish convention applied, checked
    byte for byte against the plain assembly: the two differ exactly where a HLT became FINISH."""
    converted, count = finish_marked(source)
    try:
        plain = assemble(source, guest.CODE)
        code = assemble(converted, guest.CODE)
    except AsmError as e:
        raise ImageError(e.what, f"{origin}: {e.where}" if e.where else origin) from None
    diff = [i for i, (a, b) in enumerate(zip(plain, code)) if a != b]
    if len(plain) != len(code) or len(diff) != count or any(
            plain[i] != HLT or code[i] != FINISH for i in diff):
        raise ImageError(f"cannot turn the program's hlt into {FINISH:#x} byte for byte "
                         "(a hlt on a line with other statements?)", origin)
    if count == 0:
        raise ImageError("the program has no hlt: under QEMU a vCPU reports when it reaches "
                         "hlt, as Machine's run() ends there", origin)
    if len(code) > layout.MAX_PROGRAM:
        raise ImageError(f"program is {len(code)} bytes; an image holds at most "
                         f"{layout.MAX_PROGRAM:#x}", origin)
    return code


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise UserError(f"`{name}` not found on PATH: building an image needs GNU binutils "
                        "(apt-get install binutils)")
    return path


def runtime_source() -> str:
    return resources.files(__package__).joinpath("runtime.S").read_text()


def build_runtime(vcpus: int, mem_size: int, program_size: int) -> bytes:
    """runtime.S assembled (GNU as) and linked (ld, flat binary at layout.LOAD)."""
    syms = layout.defsyms(vcpus, mem_size, program_size)
    with tempfile.TemporaryDirectory(prefix="kvmgate-image-") as tmp:
        src, obj, out = Path(tmp, "runtime.S"), Path(tmp, "runtime.o"), Path(tmp, "runtime.bin")
        src.write_text(runtime_source())
        args = [_tool("as"), "--64", "-o", str(obj), str(src)]
        for k, v in syms.items():
            args[1:1] = ["--defsym", f"{k}={v:#x}"]
        _run(args, "as")
        _run([_tool("ld"), "-m", "elf_x86_64", "-nostdlib", "-static", f"-Ttext={layout.LOAD:#x}",
              "-e", "_start", "--oformat=binary", "-o", str(out), str(obj)], "ld")
        code = out.read_bytes()
    if layout.LOAD + len(code) > guest.CODE:
        raise RuntimeError(f"image runtime is {len(code)} bytes: it overlaps the program at "
                           f"{guest.CODE:#x}")
    return code


def _run(args: list[str], what: str) -> None:
    p = subprocess.run(args, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"{what} failed on the image runtime (a kvmgate bug): {p.stderr.strip()}")


def make_image(source: str, vcpus: int = 1, *, mem_size: int = layout.DEFAULT_MEM_SIZE,
               origin: str = "<program>") -> bytes:
    """The bytes of a bootable image running `source` (kvmgate guest assembly) on `vcpus`."""
    if not isinstance(vcpus, int) or not 1 <= vcpus <= layout.MAX_VCPUS:
        raise UserError(f"vcpus={vcpus!r}: an image runs 1..{layout.MAX_VCPUS} vCPUs", "--vcpus")
    low = guest.DATA + 0x100000 + vcpus * guest.STACK_SIZE
    if not isinstance(mem_size, int) or mem_size < low or mem_size % (1 << 20) or mem_size > guest.MAPPED:
        raise UserError(f"mem_size={mem_size!r}: whole MiB from {low:#x} to {guest.MAPPED:#x}",
                        "mem_size")
    program = assemble_program(source, origin)
    runtime = build_runtime(vcpus, mem_size, len(program))
    return runtime + bytes(guest.CODE - layout.LOAD - len(runtime)) + program


def build_image(source, out, vcpus: int = 1, *, mem_size: int = layout.DEFAULT_MEM_SIZE) -> Path:
    """Write the image for the guest program file `source` (.S) to `out`; returns out's Path.
    ImageError (a UserError) naming the file and line for a program that cannot be built."""
    src = Path(source)
    try:
        data = src.read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read guest: {e.strerror}", str(source)) from None
    if src.suffix.lower() in guest.BINARY_SUFFIXES:
        raise ImageError("an image is built from assembly source (its hlt are rewritten); "
                         "flat binaries are not supported", str(source))
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ImageError("not UTF-8 assembly source", str(source)) from None
    image = make_image(text, vcpus, mem_size=mem_size, origin=str(source))
    dst = Path(out)
    try:
        tmp = dst.with_name(f".{dst.name}.tmp")
        tmp.write_bytes(image)
        tmp.replace(dst)
    except OSError as e:
        raise UserError(f"cannot write image: {e.strerror}", str(out)) from None
    return dst
