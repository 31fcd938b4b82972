"""A tiny QEMU guest for `kvmgate bench wrap` and the wrap tests: a PVH ELF (booted by `-M microvm -kernel`, ~0.2 s)
that enters long mode (its own EFER write: policies must allow writes of IA32_EFER) and performs a table of RDMSR/WRMSR accesses on every vCPU, catches
#GP (its own IDT), prints one line per access on the serial port and leaves through
isa-debug-exit (QEMU exit code 33).

Line format:  "R VCPU MSR OP VALUE FAULT"  (hex; OP 0 = read, 1 = write; VALUE = EDX:EAX after
the access), then "DONE".  vCPU 1 is started with INIT/SIPI through the local APIC, runs the
same table and vCPU 0 prints both once vCPU 1 is done.

`wait` != 0 makes vCPU 0 first read the first MSR until its low 32 bits equal `wait` (the
reload test), after printing "W".  `loops` > 0 instead repeats the first access that many times between two RDTSCs and prints
"T CYCLES" (the bench; a write stores value + a counter, a new value each time).  Built with GNU as + ld.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

EXIT_OK = 33            # isa-debug-exit: (0x10 << 1) | 1

ASM = r"""
.section .note.pvh, "a"
.align 4
.long 4, 4, 18                  # XEN_ELFNOTE_PHYS32_ENTRY
.asciz "Xen"
.long _start

.text
.code32
.globl _start
_start:                         # PVH: 32-bit protected mode, paging off
    cli
    lgdt gdtr
    mov $pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax              # PAE
    mov %eax, %cr4
    mov $0xc0000080, %ecx       # EFER.LME
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax        # PG | PE
    mov %eax, %cr0
    ljmp $0x08, $bsp64

.code64
bsp64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x80000, %rsp
    # IDT: vector 13 (#GP) -> gp
    mov $gp, %rax
    mov %ax, idt + 13*16
    movw $0x08, idt + 13*16 + 2
    movw $0x8e00, idt + 13*16 + 4
    shr $16, %rax
    mov %ax, idt + 13*16 + 6
    shr $16, %rax
    mov %eax, idt + 13*16 + 8
    lidt idtr
    mov wait_for, %ebx          # reload tests: spin until the first MSR reads this value
    test %ebx, %ebx
    jz 1f
    mov $'W', %al               # "W": spinning now
    call putc
    mov $'\n', %al
    call putc
    mov table, %ecx
0:  rdmsr
    cmp %eax, %ebx
    jne 0b
1:  cmpl $0, write_loop       # introspection tests: write the first MSR (value + 1, + 2,
    je 15f                      # ...) until it reads back something else; print "V VALUE"
    mov table, %ecx
    mov table+8, %esi
    mov table+12, %ebp
16: inc %esi
    mov %esi, %eax
    mov %ebp, %edx
    wrmsr
    rdmsr
    cmp %esi, %eax
    je 16b
    mov %eax, %r8d
    mov %edx, %r9d
    mov $'V', %al
    call putc
    call space
    mov %r9d, %ecx
    call hex
    mov %r8d, %ecx
    call hex
    mov $'\n', %al
    call putc
15: xor %edi, %edi
    call tests
    cmpl $1, ncpus
    je print
    # vCPU 1: copy the trampoline to 0x8000, INIT + SIPI(0x08)
    mov $tramp_load, %rsi
    mov $0x8000, %rdi
    mov $(tramp_end - tramp_start), %rcx
    rep movsb
    mov $0xfee00300, %rdx       # local APIC ICR
    movl $0x01000000, 0x10(%rdx)
    movl $0x00004500, (%rdx)
    movl $0x01000000, 0x10(%rdx)
    movl $0x00004608, (%rdx)
2:  pause
    cmpl $0, ap_done
    je 2b
print:
    xor %ebx, %ebx              # vCPU
3:  cmp ncpus, %ebx
    jae 9f
    mov %ebx, %eax
    imul $RESULT_BYTES, %eax
    lea results(%rax), %rbp     # this vCPU's results: (value u64, fault u32, pad u32) per test
    mov $table, %rsi
4:  mov (%rsi), %ecx
    cmp $0xffffffff, %ecx
    je 8f
    mov $'R', %al
    call putc
    call space
    mov %ebx, %ecx
    call hex
    call space
    mov (%rsi), %ecx
    call hex
    call space
    mov 4(%rsi), %ecx
    call hex
    call space
    mov 4(%rbp), %ecx
    call hex
    mov 0(%rbp), %ecx
    call hex
    call space
    mov 8(%rbp), %ecx
    call hex
    mov $'\n', %al
    call putc
    add $16, %rsi
    add $16, %rbp
    jmp 4b
8:  inc %ebx
    jmp 3b
9:  cmpl $0, loops
    je 10f
    mov $'T', %al
    call putc
    call space
    mov cycles+4, %ecx
    call hex
    mov cycles, %ecx
    call hex
    mov $'\n', %al
    call putc
10: mov $msg_done, %rsi
11: lodsb
    test %al, %al
    jz 12f
    call putc
    jmp 11b
12: mov $0x10, %al
    out %al, $0xf4
13: cli
    hlt
    jmp 13b

# tests: run the table on vCPU %edi
tests:
    mov %edi, %eax
    imul $RESULT_BYTES, %eax
    lea results(%rax), %rbp
    cmpl $0, loops
    jne bench
    mov $table, %rsi
1:  mov (%rsi), %ecx
    cmp $0xffffffff, %ecx
    je 3f
    movl $0, fault(,%rdi,4)
    mov 8(%rsi), %eax
    mov 12(%rsi), %edx
    cmpl $0, 4(%rsi)
    jne 2f
    xor %eax, %eax
    xor %edx, %edx
    rdmsr
    jmp 4f
2:  wrmsr
4:  mov %eax, 0(%rbp)
    mov %edx, 4(%rbp)
    mov fault(,%rdi,4), %eax
    mov %eax, 8(%rbp)
    add $16, %rsi
    add $16, %rbp
    jmp 1b
3:  ret

bench:
    mov table, %ecx
    mov loops, %ebx
    rdtsc
    mov %eax, cycles
    mov %edx, cycles+4
    cmpl $0, table+4
    jne 6f
5:  rdmsr
    dec %ebx
    jnz 5b
    jmp 7f
6:  mov table+8, %eax           # a write: value + counter, each differs from the previous
    add %ebx, %eax
    mov table+12, %edx
    wrmsr
    dec %ebx
    jnz 6b
7:  rdtsc
    sub cycles, %eax
    sbb cycles+4, %edx
    mov %eax, cycles
    mov %edx, cycles+4
    ret

gp: add $8, %rsp                # error code
    addq $2, (%rsp)             # skip the 2-byte RDMSR / WRMSR
    push %rax
    mov $0xfee00020, %eax       # local APIC ID = vCPU
    mov (%rax), %eax
    shr $24, %eax
    movl $1, fault(,%rax,4)
    pop %rax
    iretq

space:
    mov $' ', %al
putc:
    push %rdx
    mov $0x3f8, %dx
    out %al, %dx
    pop %rdx
    ret

hex:                            # %ecx as 8 hex digits
    push %rax
    push %rbx
    mov $8, %ebx
1:  rol $4, %ecx
    mov %cl, %al
    and $0xf, %al
    add $'0', %al
    cmp $'9', %al
    jbe 2f
    add $7, %al
2:  call putc
    dec %ebx
    jnz 1b
    pop %rbx
    pop %rax
    ret

ap64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x70000, %rsp
    lidt idtr
    mov $1, %edi
    call tests
    movl $1, ap_done
1:  cli
    hlt
    jmp 1b

.data
.align 4096
pml4: .quad pdpt + 3
    .fill 511, 8, 0
pdpt: .quad pd + 3, 0, 0, pd3 + 3    # 0-1 GiB (RAM) and 3-4 GiB (local APIC), 2 MiB pages
    .fill 508, 8, 0
pd:
    .set i, 0
    .rept 512
    .quad (i << 21) | 0x83
    .set i, i + 1
    .endr
pd3:
    .set i, 0
    .rept 512
    .quad (0xc0000000 + (i << 21)) | 0x9b     # uncached
    .set i, i + 1
    .endr
.align 8
gdt: .quad 0, 0x00af9a000000ffff, 0x00cf92000000ffff
gdtr: .word 23
    .long gdt
.align 16
idt: .fill 64, 8, 0
idtr: .word 32*16-1
    .quad idt
fault: .long 0, 0
ap_done: .long 0
ncpus: .long NCPUS
loops: .long LOOPS
wait_for: .long WAIT
write_loop: .long WLOOP
cycles: .quad 0
msg_done: .asciz "DONE\n"
.align 16
table:
TABLE
    .long 0xffffffff, 0, 0, 0
.align 16
results: .fill 2*RESULT_BYTES, 1, 0

# the AP trampoline: real mode at 0x8000 straight into long mode
.section .tramp, "ax"
.code16
tramp_start:
    cli
    lgdtl (tramp_gdtr - tramp_start + 0x8000)
    mov $pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $0xc0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax
    mov %eax, %cr0
    ljmpl $0x08, $ap64
tramp_gdtr: .word 23
    .long gdt
tramp_end:
"""

LDS = """ENTRY(_start)
PHDRS { text PT_LOAD; note PT_NOTE; }
SECTIONS {
  . = 0x100000;
  .text : { *(.text) } :text
  .note.pvh : { *(.note.pvh) } :text :note
  .data : { *(.data) } :text
  tramp_load = .;
  .tramp : { *(.tramp) } :text
  /DISCARD/ : { *(.comment) *(.note.gnu.*) }
}
"""


def table_lines(accesses) -> str:
    """accesses: [(msr, is_write, value)]."""
    out = []
    for msr, write, value in accesses:
        out.append(f"    .long {msr:#x}, {int(bool(write))}, {value & 0xffffffff:#x}, {value >> 32:#x}")
    return "\n".join(out)


def build(accesses, out_dir: Path, vcpus: int = 1, loops: int = 0, wait: int = 0,
          name: str = "guest", write_loop: bool = False) -> Path:
    """Assemble and link the guest; returns the ELF path.  `write_loop`: vCPU 0 first writes
    the first access's MSR with its value + 1, + 2, ... until a read-back differs (someone
    reverted a write: the introspection tests), prints "V VALUE-READ", then runs the table."""
    if vcpus not in (1, 2):
        raise ValueError("the test guest runs on 1 or 2 vCPUs")
    out_dir = Path(out_dir)
    src = ASM.replace("TABLE", table_lines(accesses)).replace("NCPUS", str(vcpus)) \
             .replace("LOOPS", str(loops)).replace("WAIT", str(wait)).replace("WLOOP", str(int(write_loop))).replace("RESULT_BYTES", str(16 * (len(accesses) + 1)))
    s, o, elf, ld = (out_dir / f"{name}.{ext}" for ext in ("S", "o", "elf", "ld"))
    s.write_text(src)
    ld.write_text(LDS)
    for cmd in (["as", "--64", "-o", str(o), str(s)],
                ["ld", "--no-warn-rwx-segments", "-m", "elf_x86_64", "-T", str(ld), "-o", str(elf), str(o)]):
        r = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {r.stderr}")
    # QEMU boots PVH from ELF32 only: the same image in an ELF32 container
    elf32 = out_dir / f"{name}.pvh"
    subprocess.run(["objcopy", "-O", "elf32-i386", str(elf), str(elf32)], check=True)
    return elf32


def qemu_argv(elf: Path, vcpus: int = 1) -> list[str]:
    return [shutil.which("qemu-system-x86_64") or "qemu-system-x86_64", "-M", "microvm",
            "-enable-kvm", "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-kernel", str(elf), "-no-reboot", "-smp", str(vcpus), "-m", "64"]


def parse(stdout: str) -> dict:
    """Serial output -> {(vcpu, msr, op): (value, fault)} (+ 'cycles' for the bench, 'done')."""
    out: dict = {"done": False}
    for line in stdout.splitlines():
        w = line.split()
        if w[:1] == ["R"] and len(w) == 6:
            out[(int(w[1], 16), int(w[2], 16), int(w[3], 16))] = (int(w[4], 16), int(w[5], 16))
        elif w[:1] == ["T"] and len(w) == 2:
            out["cycles"] = int(w[1], 16)
        elif w[:1] == ["V"] and len(w) == 2:
            out["reverted"] = int(w[1], 16)
        elif w == ["DONE"]:
            out["done"] = True
    return out
