; Two (or more) vCPUs: MSRs KVM itself handles, written and read back with values that depend
; on the vCPU index (RDI), accesses KVM refuses with #GP, a sync point, and memory the program
; never wrote (zero under Machine).  Results in r8..r15.
    mov ecx, 0xc0000102         ; IA32_KERNEL_GS_BASE = 0xffff800000001000 + index
    lea eax, [rdi + 0x1000]
    mov edx, 0xffff8000
    wrmsr
    xor eax, eax
    xor edx, edx
    rdmsr
    shl rdx, 32
    or rax, rdx
    mov r8, rax
    mov ecx, 0xc0000082         ; IA32_LSTAR non-canonical: #GP
    xor eax, eax
    mov edx, 0x8000
    wrmsr
    mov eax, 0x81a00000         ; IA32_LSTAR = 0xffffffff81a00000 + index
    add eax, edi
    mov edx, 0xffffffff
    wrmsr
    rdmsr
    shl rdx, 32
    or rax, rdx
    mov r9, rax
    mov ecx, 0x277              ; IA32_PAT with reserved memory type 2: #GP
    mov eax, 0x02020202
    mov edx, eax
    wrmsr
    mov eax, 0x00070106         ; IA32_PAT = 0x0007040600070106
    mov edx, 0x00070406
    wrmsr
    xor eax, eax
    rdmsr
    shl rdx, 32
    or rax, rdx
    mov r10, rax
    mov ecx, 0xc0000081         ; IA32_STAR = (0x00230010 + index) << 32
    xor eax, eax
    lea edx, [rdi + 0x00230010]
    wrmsr
    rdmsr
    shl rdx, 32
    or rax, rdx
    mov r11, rax
    mov ecx, 0xc0000084         ; IA32_FMASK
    mov eax, 0x47700
    xor edx, edx
    wrmsr
    rdmsr
    mov r12, rax
    mov ecx, 0x1b               ; IA32_APIC_BASE: the BSP flag on vCPU 0 only
    rdmsr
    mov r13, rax
    mov ecx, 0x12345678         ; not an MSR: #GP, RAX = RDX = 0
    mov eax, 0xffffffff
    rdmsr
    mov r14, rax
    out 0x80, al                ; a sync point: Machine's port handlers; harmless under QEMU
    mov rax, [0x100000]         ; memory nobody wrote
    or rax, [0x200000]
    or rax, [0x3f0000]
    mov r15, rax
    hlt
