; Probe guest for the example policy: one access per line, then halt.
    mov ecx, 0x10          ; IA32_TSC: allowed
    rdmsr
    mov ecx, 0xc0000080    ; IA32_EFER: allowed
    rdmsr
    mov ecx, 0x35          ; MSR_CORE_THREAD_COUNT: constant from user space
    rdmsr
    mov ecx, 0xc0000082    ; IA32_LSTAR write of an allowed value: emulated
    mov eax, 0x81a00000
    mov edx, 0xffffffff
    wrmsr
    mov ecx, 0xc0000082    ; IA32_LSTAR write of another value: #GP
    mov eax, 0xdeadbeef
    mov edx, 0
    wrmsr
    mov ecx, 0x186         ; IA32_PERFEVTSEL0: ignored
    mov eax, 0x1234
    xor edx, edx
    wrmsr
    mov ecx, 0x1a0         ; IA32_MISC_ENABLE: listed nowhere, denied
    rdmsr
    mov ecx, 0x12345678    ; not an MSR: denied by the default
    rdmsr
    hlt
