"""The guest's fixed layout and runtime: identity-mapped long mode, GDT, IDT, #GP handler.

Guest-physical addresses (identity-mapped, so also the guest's virtual addresses):
"""
from __future__ import annotations

import struct
from pathlib import Path

from . import uapi as u
from .asm import assemble
from .errors import GuestFileError
from .inputs import MiB, decode_text, read_user_file

GDT = 0x1000
IDT = 0x2000
PML4 = 0x3000
PDPT = 0x4000
PD = 0x5000
TSS = 0x7000
RUNTIME = 0x8000          # exception stubs and the #GP handler
CODE = 0x10000            # the user's program starts here
DATA = 0x100000           # free for the program's data (1 MiB)
MAX_PROGRAM = DATA - CODE  # bytes of program that fit below DATA
STACK_SIZE = 0x4000       # per vCPU, at the top of memory
MAX_VCPUS = 64            # vCPUs a Machine runs (KVM_CAP_MAX_VCPUS is larger on any host)
MAPPED = 1 << 30          # page tables map the first GiB with 2 MiB pages

GP_PORT = 0xE0F0          # runtime: an RDMSR/WRMSR faulted and was skipped
EXC_PORT = 0xE0F1         # runtime: any other exception; the vCPU halts

SEL_CODE, SEL_DATA, SEL_TSS = 0x08, 0x10, 0x18
_ERRCODE_VECTORS = {8, 10, 11, 12, 13, 14, 17, 21, 29, 30}


_EXC_COMMON = "\n".join([
    # any exception other than an MSR #GP: at the port exit RAX = vector, RBX = error code,
    # RCX = RIP; the vCPU stops
    "mov rax, [rsp]", "mov rbx, [rsp+8]", "mov rcx, [rsp+16]",
    f"mov dx, {EXC_PORT}", "out dx, al",
    "exc_halt: hlt", "jmp exc_halt",
])

_GP = "\n".join([
    # #GP on RDMSR/WRMSR: skipped, RDMSR leaves RAX=RDX=0; at the port exit RAX = the
    # instruction's RIP and RCX = the MSR index
    "push rax", "push rdx",
    "mov rax, [rsp+24]",
    "mov dx, word ptr [rax]",
    "cmp dx, 0x320f", "je gp_rdmsr",
    "cmp dx, 0x300f", "je gp_skip",
    "pop rdx", "pop rax", "push 13", f"jmp {RUNTIME}",
    "gp_rdmsr:",
    "mov qword ptr [rsp], 0", "mov qword ptr [rsp+8], 0",
    "gp_skip:",
    "add qword ptr [rsp+24], 2",
    f"mov dx, {GP_PORT}", "out dx, al",
    "pop rdx", "pop rax", "add rsp, 8", "iretq",
])

GP_HANDLER = RUNTIME + 0x100   # the #GP handler, after the common exception path
_STUBS = RUNTIME + 0x400       # one 16-byte stub per vector


def _runtime_source() -> str:
    """The whole runtime as one program at RUNTIME: `.org` puts each piece at its address."""
    parts = [_EXC_COMMON, f".org {GP_HANDLER - RUNTIME:#x}", _GP]
    for v in range(32):
        if v != 13:
            push = "" if v in _ERRCODE_VECTORS else "push 0\n"
            parts += [f".org {_STUBS + 16 * v - RUNTIME:#x}", f"{push}push {v}\njmp {RUNTIME:#x}"]
    return "\n".join(parts)


def handler_address(vector: int) -> int:
    return GP_HANDLER if vector == 13 else _STUBS + 16 * vector


def build_image(mem: memoryview, program: bytes) -> None:
    """Write page tables, GDT, TSS, IDT, runtime and program into guest memory."""
    if CODE + len(program) > DATA:
        raise GuestFileError(f"guest program is {len(program)} bytes; at most {MAX_PROGRAM} fit "
                             f"between {CODE:#x} and {DATA:#x}")
    struct.pack_into("<Q", mem, PML4, PDPT | 3)
    struct.pack_into("<Q", mem, PDPT, PD | 3)
    for i in range(MAPPED >> 21):
        struct.pack_into("<Q", mem, PD + 8 * i, (i << 21) | 0x83)
    struct.pack_into("<QQQ", mem, GDT, 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF)
    lo = 0x67 | ((TSS & 0xFFFFFF) << 16) | (0x8B << 40) | (((TSS >> 24) & 0xFF) << 56)
    struct.pack_into("<QQ", mem, GDT + SEL_TSS, lo, TSS >> 32)
    runtime = assemble(_runtime_source(), RUNTIME, "<kvmgate guest runtime>")
    mem[RUNTIME:RUNTIME + len(runtime)] = runtime
    for vec in range(32):
        addr = handler_address(vec)
        struct.pack_into("<HHBBHII", mem, IDT + 16 * vec,
                         addr & 0xFFFF, SEL_CODE, 0, 0x8E, (addr >> 16) & 0xFFFF, addr >> 32, 0)
    mem[CODE:CODE + len(program)] = program


def _segment(selector: int, type_: int, code: bool) -> u.kvm_segment:
    return u.kvm_segment(base=0, limit=0xFFFFFFFF, selector=selector, type=type_, present=1,
                         dpl=0, db=0 if code else 1, s=1, l=1 if code else 0, g=1)


def long_mode_sregs(sregs: u.kvm_sregs) -> None:
    """64-bit mode, paging on (CR3 = PML4), interrupts handled by our IDT."""
    sregs.cs = _segment(SEL_CODE, 11, True)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, _segment(SEL_DATA, 3, False))
    sregs.tr = u.kvm_segment(base=TSS, limit=0x67, selector=SEL_TSS, type=11, present=1)
    sregs.ldt = u.kvm_segment(type=2, present=1, unusable=1)
    sregs.gdt.base, sregs.gdt.limit = GDT, 0x27
    sregs.idt.base, sregs.idt.limit = IDT, 16 * 32 - 1
    sregs.cr0 = 0x80050033      # PG WP NE ET MP PE
    sregs.cr3 = PML4
    sregs.cr4 = 0x620           # OSXMMEXCPT OSFXSR PAE
    sregs.efer = 0x500          # LMA LME


def entry_regs(regs: u.kvm_regs, vcpu_index: int, mem_size: int) -> None:
    """RIP at the program, own stack per vCPU, interrupts off; the vCPU index is in RDI."""
    C_zero = u.kvm_regs()
    for f, _ in u.kvm_regs._fields_:
        setattr(regs, f, getattr(C_zero, f))
    regs.rip = CODE
    regs.rsp = mem_size - vcpu_index * STACK_SIZE
    regs.rdi = vcpu_index
    regs.rflags = 0x2


BINARY_SUFFIXES = (".bin", ".img", ".raw")
SOURCE_SUFFIXES = (".s", ".asm")
MAX_SOURCE_BYTES = 4 * MiB


def load_guest(path) -> bytes:
    """A guest program file as machine code for CODE: assembly (.S/.s/.asm, ASCII, assembled
    here so errors name this file and line) or a flat binary (.bin/.img/.raw) of at most
    MAX_PROGRAM bytes.  GuestFileError/AsmError/InputFileError (all UserError) otherwise."""
    name = str(path)
    suffix = Path(name).suffix.lower()
    if suffix in BINARY_SUFFIXES:
        data = read_user_file(path, "guest program", MAX_PROGRAM)
        if not data:
            raise GuestFileError("flat binary guest is empty", name)
        return data
    if suffix not in SOURCE_SUFFIXES:
        raise GuestFileError(f"unknown guest file suffix {suffix or '(none)'!r}: use "
                             ".S/.s/.asm for assembly, "
                             f"{'/'.join(BINARY_SUFFIXES)} for a flat binary", name)
    text = decode_text(read_user_file(path, "guest program", MAX_SOURCE_BYTES), name,
                       "guest program", "ascii")
    return assemble(text, CODE, name, MAX_PROGRAM)
