/*
 * kvmgate image runtime: boots a kvmgate guest program under QEMU (multiboot v1, "a.out
 * kludge" addresses) into the environment kvmgate.machine.Machine gives it, and reports what
 * every vCPU did on COM1, then ends QEMU through isa-debug-exit.
 *
 * Assembled by GNU as and linked by ld at LOAD (kvmgate.image.build); the builder passes the
 * layout with --defsym (one source: kvmgate.guest and kvmgate.image.layout):
 *   LOAD GDT IDT PML4 PDPT PD TSS CODE STACK_SIZE MEM_SIZE VCPUS PROG_END
 *   EXIT_DONE EXIT_EXCEPTION EXIT_SETUP
 *
 * Boot (bootstrap processor, 32-bit protected mode, paging off, from the multiboot loader):
 *   page tables (first GiB, 2 MiB pages) where kvmgate.guest puts them; check QEMU's vCPU count
 *   (fw_cfg FW_CFG_NB_CPUS); INIT-SIPI-SIPI to the other vCPUs (xAPIC ICR, all-excluding-self),
 *   which start in real mode at `trampoline`; long mode; GDT, IDT and TSS where kvmgate.guest
 *   puts them, and zeroes QEMU's multiboot command line after the program (see long64 for
 *   the rest of memory).  The others wait for the tables in long mode.  Every vCPU enters long mode (CR4 = PAE|OSFXSR|OSXMMEXCPT, EFER.LME
 *   by WRMSR - the one MSR access the runtime makes -, CR0 = 0x80050033, as kvmgate.guest's
 *   long_mode_sregs), loads the GDT, IDT and TR, takes its index (the BSP 0, the others in the
 *   order they arrive), waits until all are ready and jumps to the program with RSP =
 *   MEM_SIZE - index * STACK_SIZE, RDI = index, RFLAGS = 0x2, every other register zero.
 *
 * While the program runs:
 *   #GP on RDMSR (0f 32) / WRMSR (0f 30): recorded in the vCPU's slot (RIP, MSR index = ECX),
 *     skipped; a faulting RDMSR leaves RAX = RDX = 0 (as kvmgate.guest's #GP handler);
 *   #UD at a byte FINISH (0xd6): the program finished.  The builder assembles every `hlt` of the
 *     program as that byte (both one byte, so every address stays the same; not int3: on
 *     kvm_pvm a guest INT3 ends QEMU with "KVM internal error ... emulation failure"): the handler
 *     stores the registers as they were there (RIP after it, as after a HLT exit) and parks the
 *     vCPU (cli; hlt).  The last vCPU to finish prints one line per vCPU on COM1 and exits QEMU
 *     with EXIT_DONE;
 *   any other exception: one `exception` line, exit with EXIT_EXCEPTION.
 * The vCPU of a handler is found from its initial APIC ID (CPUID.1:EBX[31:24]), not from
 * anything the program can change.
 */
        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0x00010000          /* addresses in the header (not ELF) */
        .set SEL_CODE64, 0x08
        .set SEL_DATA, 0x10
        .set SEL_TSS, 0x18                 /* final GDT */
        .set SEL_CODE32, 0x18              /* boot GDT */
        .set COM1, 0x3f8
        .set DEBUG_EXIT, 0xf4
        .set FW_CFG_PORT_SEL, 0x510
        .set FW_CFG_PORT_DATA, 0x511
        .set FW_CFG_NB_CPUS, 0x05
        .set APIC_SVR, 0xfee000f0
        .set APIC_ICR_LO, 0xfee00300
        .set APIC_ICR_HI, 0xfee00310
        .set MSR_EFER, 0xc0000080
        .set FINISH, 0xd6                  /* SALC: undefined in 64-bit mode, so #UD */
        .set AP_WAIT_CYCLES, 0x200000000   /* TSC cycles the BSP waits for the others (~3 s) */
        .set TRAMPOLINE, LOAD + 0x1000
        .set BOOT_STACK_SHIFT, 7
        .set BOOT_STACK, 1 << BOOT_STACK_SHIFT   /* per vCPU, for the runtime's own calls */
        /* a vCPU's slot: registers at its end, then its #GP faults (RIP, MSR index) */
        .set SLOT_SIZE, 0x400
        .set SLOT_REGS, 0                  /* rax rbx rcx rdx rsi rdi rsp rbp r8..r15 */
        .set SLOT_RIP, 128
        .set SLOT_RFLAGS, 136
        .set SLOT_DONE, 144
        .set SLOT_NFAULTS, 148
        .set SLOT_DROPPED, 152
        .set SLOT_FAULTS, 160
        .set MAX_FAULTS, (SLOT_SIZE - SLOT_FAULTS) / 16

        .text
        .code32
        .globl _start
_start:
mb_header:
        .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
        .long mb_header                    /* header_addr */
        .long LOAD                         /* load_addr: the file from its start */
        .long PROG_END                     /* load_end_addr: runtime, padding, program */
        .long 0                            /* bss_end_addr */
        .long entry32                      /* entry_addr */

entry32:
        cli
        cld
        mov     $(boot_stacks + BOOT_STACK), %esp  /* vCPU 0's scratch stack */
        /* Only the page tables here: with paging off some hosts emulate every instruction
           (kvm_pvm), so the rest is done in long mode (long64) */
        xor     %eax, %eax
        mov     $PML4, %edi
        mov     $(PD - PML4) / 4, %ecx     /* PML4 and PDPT; every PD entry is written */
        rep stosl
        /* PML4[0] -> PDPT, PDPT[0] -> PD, PD[i] = i * 2 MiB | PS | RW | P: the first GiB */
        movl    $(PDPT | 3), PML4
        movl    $(PD | 3), PDPT
        mov     $PD, %edi
        mov     $0x83, %eax
        mov     $512, %ecx
1:      mov     %eax, (%edi)
        add     $0x200000, %eax
        add     $8, %edi
        loop    1b

        /* no interrupts, even after an STI in the program (Machine injects none): mask
           both 8259 PICs */
        mov     $0xff, %al
        out     %al, $0x21
        out     %al, $0xa1

        /* as many vCPUs as the image was built for? */
        mov     $FW_CFG_PORT_SEL, %dx
        mov     $FW_CFG_NB_CPUS, %ax
        out     %ax, %dx
        mov     $FW_CFG_PORT_DATA, %dx
        in      %dx, %al
        movzbl  %al, %ecx
        in      %dx, %al
        movzbl  %al, %eax
        shl     $8, %eax
        or      %eax, %ecx
        mov     %ecx, qemu_cpus
        cmp     $VCPUS, %ecx
        jne     bad_cpu_count32

.if VCPUS > 1
        /* start the others: xAPIC on, INIT, SIPI, SIPI (vector: the trampoline's page) */
        orl     $0x1ff, APIC_SVR
        movl    $0, APIC_ICR_HI
        movl    $0x000c4500, APIC_ICR_LO
        call    icr_wait
        mov     $0x200000, %esi
        call    tsc_delay
        movl    $(0x000c4600 | (TRAMPOLINE >> 12)), APIC_ICR_LO
        call    icr_wait
        mov     $0x80000, %esi
        call    tsc_delay
        movl    $(0x000c4600 | (TRAMPOLINE >> 12)), APIC_ICR_LO
        call    icr_wait
.endif
        xor     %ebp, %ebp                 /* EBP = 0: the bootstrap processor */
        jmp     common32

icr_wait:                                  /* until the ICR's delivery status is idle */
        pause
        testl   $0x1000, APIC_ICR_LO
        jnz     icr_wait
        ret

tsc_delay:                                 /* ESI TSC cycles */
        rdtsc
        mov     %eax, %ebx
1:      pause
        rdtsc
        sub     %ebx, %eax
        cmp     %esi, %eax
        jb      1b
        ret

bad_cpu_count32:                           /* "kvmgate-image error: vcpus qemu=M image=N" */
        mov     $msg_cpus, %esi
        call    puts32
        mov     qemu_cpus, %eax
        call    putdec32
        mov     $msg_cpus2, %esi
        call    puts32
        mov     $VCPUS, %eax
        call    putdec32
        mov     $'\n', %al
        call    putc32
        mov     $EXIT_SETUP, %al
        jmp     exit32

puts32:                                    /* ESI: NUL-terminated */
        lodsb
        test    %al, %al
        jz      1f
        call    putc32
        jmp     puts32
1:      ret

putdec32:                                  /* EAX < 100000 */
        mov     $10, %ecx
        xor     %edi, %edi
1:      xor     %edx, %edx
        div     %ecx
        push    %edx
        inc     %edi
        test    %eax, %eax
        jnz     1b
2:      pop     %eax
        add     $'0', %al
        call    putc32
        dec     %edi
        jnz     2b
        ret

putc32:                                    /* AL, when the transmitter holds nothing */
        push    %eax
        mov     $(COM1 + 5), %dx
1:      in      %dx, %al
        test    $0x20, %al
        jz      1b
        pop     %eax
        mov     $COM1, %dx
        out     %al, %dx
        ret

exit32:                                    /* AL: the isa-debug-exit value */
        mov     %al, %bl
        mov     $(COM1 + 5), %dx
1:      in      %dx, %al
        test    $0x40, %al                 /* everything sent */
        jz      1b
        mov     %bl, %al
        out     %al, $DEBUG_EXIT
2:      cli
        hlt
        jmp     2b

/* ---- the other vCPUs start here in real mode (CS:IP = trampoline page : 0) */
        .org    TRAMPOLINE - LOAD          /* a page boundary below 1 MiB: the SIPI vector */
        .code16
trampoline:
        cli
        ljmp    $0, $1f                    /* CS = 0: below 64 KiB, offsets are addresses */
1:      xor     %ax, %ax
        mov     %ax, %ds
        lgdtl   boot_gdt_desc
        mov     %cr0, %eax
        or      $1, %eax
        mov     %eax, %cr0
        ljmpl   $SEL_CODE32, $2f
        .code32
2:      mov     $SEL_DATA, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $1, %ebp                   /* EBP = 1: not the bootstrap processor */
        cld

/* ---- every vCPU: 32-bit protected mode -> long mode */
common32:
        lgdt    boot_gdt_desc
        mov     $0x620, %eax               /* OSXMMEXCPT OSFXSR PAE */
        mov     %eax, %cr4
        mov     $PML4, %eax
        mov     %eax, %cr3
        mov     $MSR_EFER, %ecx
        mov     $0x100, %eax               /* LME; LMA follows with paging */
        xor     %edx, %edx
        wrmsr
        mov     $0x80050033, %eax          /* PG AM WP NE ET MP PE */
        mov     %eax, %cr0
        ljmp    $SEL_CODE64, $long64

        .code64
long64:
        test    %ebp, %ebp
        jnz     2f
        /* the BSP.  Every guest instruction may be costly (kvm_pvm emulates them all), so
           memory is not zeroed wholesale: QEMU's RAM starts zeroed and microvm's firmware
           (qboot) leaves [PROG_END, 640 KiB) and [1 MiB, MEM_SIZE) so, but for QEMU's
           multiboot command line right after the image, zeroed here. */
        xor     %eax, %eax
        mov     $PROG_END, %edi
        mov     $((PROG_END + 0xfff) & ~0xfff) + 0x1000 - PROG_END, %ecx
        rep stosb
        mov     $TSS, %edi
        mov     $0x68 / 8, %ecx
        rep stosq
        /* GDT (null, code64, data, TSS) as kvmgate.guest.build_image; the TSS descriptor is
           "available" so that LTR takes it */
        lea     gdt_template(%rip), %rsi
        mov     $GDT, %edi
        mov     $(gdt_template_end - gdt_template) / 8, %ecx
        rep movsq
        /* IDT: 32 interrupt gates, vector v -> stubs + 16 * v (all below 64 KiB) */
        mov     $IDT, %edi
        lea     stubs(%rip), %rbx
        mov     $32, %ecx
1:      mov     %ebx, %eax
        or      $(SEL_CODE64 << 16), %eax
        mov     %eax, (%rdi)
        movl    $0x8e00, 4(%rdi)
        movq    $0, 8(%rdi)
        add     $16, %rdi
        add     $16, %rbx
        loop    1b
        movl    $1, tables_ready
        jmp     3f
2:      pause                              /* the others wait for the GDT and IDT */
        cmpl    $0, tables_ready
        je      2b
3:      lgdt    gdt_desc
        mov     $SEL_DATA, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %fs
        mov     %ax, %gs
        mov     %ax, %ss
        lidt    idt_desc
        /* LTR marks the descriptor busy: one vCPU at a time makes it available again */
1:      mov     $1, %eax
        xchg    %eax, tss_lock
        test    %eax, %eax
        jz      2f
        pause
        jmp     1b
2:      andb    $0xfd, GDT + SEL_TSS + 5
        mov     $SEL_TSS, %ax
        ltr     %ax
        movl    $0, tss_lock

        /* this vCPU's index */
        test    %ebp, %ebp
        jz      1f
        mov     $1, %eax
        lock xadd %eax, next_index
        mov     %eax, %ebp
        cmp     $VCPUS, %eax
        jae     park                       /* more vCPUs than the image runs (checked above) */
1:      mov     $1, %eax
        cpuid
        shr     $24, %ebx
        mov     %bpl, apic_to_index(%rbx)
        lea     boot_stacks(%rip), %rsp    /* a scratch stack per vCPU, for PUSHF/POPF */
        mov     %ebp, %eax
        inc     %eax
        shl     $BOOT_STACK_SHIFT, %eax
        add     %rax, %rsp
        lock incl ready

        test    %ebp, %ebp
        jnz     3f
        /* the BSP waits for everyone, then lets all go */
        rdtsc
        shl     $32, %rdx
        or      %rax, %rdx
        mov     %rdx, %rsi
2:      cmpl    $VCPUS, ready
        je      4f
        pause
        rdtsc
        shl     $32, %rdx
        or      %rax, %rdx
        sub     %rsi, %rdx
        mov     $AP_WAIT_CYCLES, %rax
        cmp     %rax, %rdx
        jb      2b
        jmp     ap_timeout
4:      movl    $1, go
        jmp     5f
3:      pause
        cmpl    $0, go
        je      3b

        /* the program's entry state (kvmgate.guest.entry_regs) */
5:      mov     %ebp, %edi
        mov     %rdi, %rax
        imul    $STACK_SIZE, %rax
        neg     %rax
        add     $MEM_SIZE, %rax
        pushq   $2
        popfq                              /* RFLAGS = 0x2: nothing below touches flags */
        mov     %rax, %rsp
        mov     $0, %eax
        mov     $0, %ebx
        mov     $0, %ecx
        mov     $0, %edx
        mov     $0, %esi
        mov     $0, %ebp
        mov     $0, %r8d
        mov     $0, %r9d
        mov     $0, %r10d
        mov     $0, %r11d
        mov     $0, %r12d
        mov     $0, %r13d
        mov     $0, %r14d
        mov     $0, %r15d
        jmp     CODE

park:
        cli
        hlt
        jmp     park

ap_timeout:
        call    serial_lock
        lea     msg_aps(%rip), %rsi
        call    puts
        mov     ready(%rip), %eax
        call    putdec
        lea     msg_aps2(%rip), %rsi
        call    puts
        mov     $VCPUS, %eax
        call    putdec
        mov     $'\n', %al
        call    putc
        mov     $EXIT_SETUP, %al
        jmp     exit64

/* ---- exception stubs: 16 bytes each; [rsp] = vector, [rsp+8] = error code, then the frame */
        .balign 16
stubs:
        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .balign 16
        .if \v == 13
        jmp     gp_handler
        .elseif \v == 6
        jmp     ud_handler
        .else
        .if (\v != 8) && (\v != 10) && (\v != 11) && (\v != 12) && (\v != 14) && (\v != 17) && (\v != 21) && (\v != 29) && (\v != 30)
        pushq   $0
        .endif
        pushq   $\v
        jmp     exc_common
        .endif
        .endr

/* RBX = this vCPU's slot (clobbers RAX, RCX, RDX) */
.macro this_slot
        mov     $1, %eax
        cpuid
        shr     $24, %ebx
        movzbl  apic_to_index(%rbx), %ebx
        cmp     $VCPUS, %ebx
        jae     lost_vcpu
        imul    $SLOT_SIZE, %ebx
        add     $slots, %rbx
.endm

gp_handler:
        push    %rax
        push    %rdx
        push    %rcx
        push    %rbx
        /* [rsp] rbx, +8 rcx, +16 rdx, +24 rax, +32 error code, +40 RIP */
        mov     40(%rsp), %rax
        movzwl  (%rax), %edx
        cmp     $0x320f, %edx              /* RDMSR */
        je      1f
        cmp     $0x300f, %edx              /* WRMSR */
        je      2f
        pop     %rbx
        pop     %rcx
        pop     %rdx
        pop     %rax
        pushq   $13
        jmp     exc_common
1:      movq    $0, 16(%rsp)               /* a faulting RDMSR leaves RDX = RAX = 0 */
        movq    $0, 24(%rsp)
2:      this_slot
        mov     SLOT_NFAULTS(%rbx), %eax
        cmp     $MAX_FAULTS, %eax
        jae     3f
        shl     $4, %rax
        mov     40(%rsp), %rdx
        mov     %rdx, SLOT_FAULTS(%rbx, %rax)
        mov     8(%rsp), %ecx              /* the MSR index (ECX) */
        mov     %rcx, SLOT_FAULTS + 8(%rbx, %rax)
        incl    SLOT_NFAULTS(%rbx)
        jmp     4f
3:      incl    SLOT_DROPPED(%rbx)
4:      addq    $2, 40(%rsp)
        pop     %rbx
        pop     %rcx
        pop     %rdx
        pop     %rax
        add     $8, %rsp
        iretq

ud_handler:
        push    %rax
        push    %rbx
        push    %rcx
        push    %rdx
        mov     32(%rsp), %rax
        cmpb    $FINISH, (%rax)
        je      finish
        pop     %rdx
        pop     %rcx
        pop     %rbx
        pop     %rax
        pushq   $0
        pushq   $6
        jmp     exc_common
finish:                                    /* the program's hlt */
        incq    32(%rsp)                   /* RIP after it, as after a HLT exit */
        /* [rsp] rdx, +8 rcx, +16 rbx, +24 rax, +32 RIP, +40 CS, +48 RFLAGS, +56 RSP */
        this_slot
        mov     24(%rsp), %rax
        mov     %rax, SLOT_REGS + 0(%rbx)
        mov     16(%rsp), %rax
        mov     %rax, SLOT_REGS + 8(%rbx)
        mov     8(%rsp), %rax
        mov     %rax, SLOT_REGS + 16(%rbx)
        mov     (%rsp), %rax
        mov     %rax, SLOT_REGS + 24(%rbx)
        mov     %rsi, SLOT_REGS + 32(%rbx)
        mov     %rdi, SLOT_REGS + 40(%rbx)
        mov     56(%rsp), %rax
        mov     %rax, SLOT_REGS + 48(%rbx)
        mov     %rbp, SLOT_REGS + 56(%rbx)
        mov     %r8, SLOT_REGS + 64(%rbx)
        mov     %r9, SLOT_REGS + 72(%rbx)
        mov     %r10, SLOT_REGS + 80(%rbx)
        mov     %r11, SLOT_REGS + 88(%rbx)
        mov     %r12, SLOT_REGS + 96(%rbx)
        mov     %r13, SLOT_REGS + 104(%rbx)
        mov     %r14, SLOT_REGS + 112(%rbx)
        mov     %r15, SLOT_REGS + 120(%rbx)
        mov     32(%rsp), %rax
        mov     %rax, SLOT_RIP(%rbx)
        mov     48(%rsp), %rax
        btr     $16, %rax                  /* RF: set in a fault's frame, not after HLT */
        mov     %rax, SLOT_RFLAGS(%rbx)
        movl    $1, SLOT_DONE(%rbx)
        mov     $1, %eax
        lock xadd %eax, finished
        inc     %eax
        cmp     $VCPUS, %eax
        jne     park
        /* the last one reports for everyone */
        call    serial_lock
        xor     %r12d, %r12d
1:      call    report_vcpu
        inc     %r12d
        cmp     $VCPUS, %r12d
        jb      1b
        lea     msg_end(%rip), %rsi
        call    puts
        mov     $EXIT_DONE, %al
        jmp     exit64

/* R12 = index: "kvmgate-image vcpu=I rax=.. .. r15=.. rip=+OFF rflags=.. faults=N dropped=N
   gp=+OFF:MSR,..." */
report_vcpu:
        mov     %r12d, %ebx
        imul    $SLOT_SIZE, %ebx
        add     $slots, %rbx
        lea     msg_vcpu(%rip), %rsi
        call    puts
        mov     %r12d, %eax
        call    putdec
        lea     reg_names(%rip), %r13
        xor     %r14d, %r14d
1:      mov     %r13, %rsi
        call    puts
        mov     %rsi, %r13
        mov     SLOT_REGS(%rbx, %r14, 8), %rax
        call    puthex
        inc     %r14d
        cmp     $16, %r14d
        jb      1b
        lea     msg_rip(%rip), %rsi
        call    puts
        mov     SLOT_RIP(%rbx), %rax
        sub     $CODE, %rax
        call    puthex
        lea     msg_rflags(%rip), %rsi
        call    puts
        mov     SLOT_RFLAGS(%rbx), %rax
        call    puthex
        lea     msg_faults(%rip), %rsi
        call    puts
        mov     SLOT_NFAULTS(%rbx), %eax
        call    putdec
        lea     msg_dropped(%rip), %rsi
        call    puts
        mov     SLOT_DROPPED(%rbx), %eax
        call    putdec
        lea     msg_gp(%rip), %rsi
        call    puts
        xor     %r14d, %r14d
2:      cmp     SLOT_NFAULTS(%rbx), %r14d
        jae     4f
        test    %r14d, %r14d
        jz      3f
        mov     $',', %al
        call    putc
3:      mov     %r14, %r15
        shl     $4, %r15
        mov     $'+', %al
        call    putc
        mov     SLOT_FAULTS(%rbx, %r15), %rax
        sub     $CODE, %rax
        call    puthex
        mov     $':', %al
        call    putc
        mov     SLOT_FAULTS + 8(%rbx, %r15), %rax
        call    puthex
        inc     %r14d
        jmp     2b
4:      mov     $'\n', %al
        jmp     putc

/* any other exception: [rsp] vector, +8 error code, +16 RIP */
exc_common:
        mov     (%rsp), %r12
        mov     8(%rsp), %r13
        mov     16(%rsp), %r14
        this_slot
        sub     $slots, %rbx
        mov     %ebx, %eax
        xor     %edx, %edx
        mov     $SLOT_SIZE, %ecx
        div     %ecx
        mov     %eax, %r15d
        call    serial_lock
        lea     msg_exc(%rip), %rsi
        call    puts
        mov     %r15d, %eax
        call    putdec
        lea     msg_vector(%rip), %rsi
        call    puts
        mov     %r12, %rax
        call    putdec
        lea     msg_error(%rip), %rsi
        call    puts
        mov     %r13, %rax
        call    puthex
        lea     msg_at(%rip), %rsi
        call    puts
        mov     %r14, %rax
        call    puthex
        mov     $'\n', %al
        call    putc
        mov     $EXIT_EXCEPTION, %al
        jmp     exit64

lost_vcpu:                                 /* an APIC ID no vCPU registered: cannot happen */
        call    serial_lock
        lea     msg_lost(%rip), %rsi
        call    puts
        mov     $EXIT_SETUP, %al
        jmp     exit64

serial_lock:                               /* held until QEMU exits */
        mov     $1, %eax
        xchg    %eax, serial_busy(%rip)
        test    %eax, %eax
        jz      1f
        pause
        jmp     serial_lock
1:      ret

puts:                                      /* RSI: NUL-terminated; returns RSI past the NUL */
        lodsb
        test    %al, %al
        jz      1f
        call    putc
        jmp     puts
1:      ret

putdec:                                    /* RAX, decimal */
        push    %rbx
        mov     $10, %ecx
        xor     %ebx, %ebx
1:      xor     %edx, %edx
        div     %rcx
        push    %rdx
        inc     %ebx
        test    %rax, %rax
        jnz     1b
2:      pop     %rax
        add     $'0', %al
        call    putc
        dec     %ebx
        jnz     2b
        pop     %rbx
        ret

puthex:                                    /* RAX: 0x and the digits without leading zeros */
        push    %rbx
        push    %rcx
        mov     %rax, %rbx
        mov     $'0', %al
        call    putc
        mov     $'x', %al
        call    putc
        mov     $60, %ecx
1:      mov     %rbx, %rax                 /* skip leading zero digits, keep the last */
        shr     %cl, %rax
        test    $0xf, %al
        jnz     2f
        test    %ecx, %ecx
        jz      2f
        sub     $4, %ecx
        jmp     1b
2:      mov     %rbx, %rax
        shr     %cl, %rax
        and     $0xf, %eax
        cmp     $10, %al
        jb      3f
        add     $('a' - '0' - 10), %al
3:      add     $'0', %al
        push    %rcx
        call    putc
        pop     %rcx
        sub     $4, %ecx
        jns     2b
        pop     %rcx
        pop     %rbx
        ret

putc:                                      /* AL */
        push    %rdx
        push    %rax
        mov     $(COM1 + 5), %dx
1:      in      %dx, %al
        test    $0x20, %al
        jz      1b
        pop     %rax
        mov     $COM1, %dx
        out     %al, %dx
        pop     %rdx
        ret

exit64:                                    /* AL: the isa-debug-exit value */
        mov     %al, %bl
        mov     $(COM1 + 5), %dx
1:      in      %dx, %al
        test    $0x40, %al
        jz      1b
        mov     %bl, %al
        out     %al, $DEBUG_EXIT
        jmp     park

/* ---- data */
        .balign 8
gdt_template:
        .quad   0
        .quad   0x00af9a000000ffff         /* 0x08: 64-bit code */
        .quad   0x00cf92000000ffff         /* 0x10: data */
        .quad   0x67 | ((TSS & 0xffffff) << 16) | (0x89 << 40) | (((TSS >> 24) & 0xff) << 56)
        .quad   TSS >> 32
gdt_template_end:
boot_gdt:
        .quad   0
        .quad   0x00af9a000000ffff         /* 0x08: 64-bit code */
        .quad   0x00cf92000000ffff         /* 0x10: data */
        .quad   0x00cf9a000000ffff         /* 0x18: 32-bit code */
boot_gdt_end:
        .balign 8
        .word   0
boot_gdt_desc:
        .word   boot_gdt_end - boot_gdt - 1
        .long   boot_gdt
        .word   0
gdt_desc:
        .word   0x27
        .quad   GDT
        .word   0
idt_desc:
        .word   16 * 32 - 1
        .quad   IDT

msg_cpus:    .asciz "kvmgate-image error: vcpus qemu="
msg_cpus2:   .asciz " image="
msg_aps:     .asciz "kvmgate-image error: started="
msg_aps2:    .asciz " image="
msg_lost:    .asciz "kvmgate-image error: a vCPU with an unknown APIC ID\n"
msg_vcpu:    .asciz "kvmgate-image vcpu="
reg_names:   .asciz " rax="
             .asciz " rbx="
             .asciz " rcx="
             .asciz " rdx="
             .asciz " rsi="
             .asciz " rdi="
             .asciz " rsp="
             .asciz " rbp="
             .asciz " r8="
             .asciz " r9="
             .asciz " r10="
             .asciz " r11="
             .asciz " r12="
             .asciz " r13="
             .asciz " r14="
             .asciz " r15="
msg_rip:     .asciz " rip=+"
msg_rflags:  .asciz " rflags="
msg_faults:  .asciz " faults="
msg_dropped: .asciz " dropped="
msg_gp:      .asciz " gp="
msg_end:     .asciz "kvmgate-image end\n"
msg_exc:     .asciz "kvmgate-image exception vcpu="
msg_vector:  .asciz " vector="
msg_error:   .asciz " error="
msg_at:      .asciz " rip="

        .balign 4
qemu_cpus:   .long 0
tss_lock:    .long 0
next_index:  .long 1
ready:       .long 0
go:          .long 0
tables_ready: .long 0
finished:    .long 0
serial_busy: .long 0
apic_to_index:
        .fill   256, 1, 0xff
        .balign 64
boot_stacks:
        .fill   BOOT_STACK * VCPUS, 1, 0
        .balign 64
slots:
        .fill   SLOT_SIZE * VCPUS, 1, 0
runtime_end:
