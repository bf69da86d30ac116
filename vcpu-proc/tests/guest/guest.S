.intel_syntax noprefix
.code64
.globl _start
_start:
    mov r15, rsi
    lea rsi, [rip + s_boot]
    call puts
    inc qword ptr [0x5000]
    mov al, byte ptr [0x5000]
    add al, '0'
    call putc
    mov al, 10
    call putc
    /* CMOS: register D must read 0x80 (valid time) */
    mov al, 0x0d
    out 0x70, al
    in al, 0x71
    cmp al, 0x80
    jne cmos_bad
    lea rsi, [rip + s_cmos]
    call puts
    mov al, 0x32
    out 0x70, al
    in al, 0x71
    call puthex
    mov al, 0x09
    out 0x70, al
    in al, 0x71
    call puthex
    mov al, 10
    call putc
    jmp dispatch
cmos_bad:
    lea rsi, [rip + s_cmosbad]
    call puts
dispatch:
    mov esi, dword ptr [r15 + 0x228]
    mov al, byte ptr [rsi]
    cmp al, 'p'
    je poweroff
    cmp al, 'r'
    je kbdreset
    cmp al, 'a'
    je acpireset
    cmp al, 't'
    je triple
    cmp al, 'c'
    je counter
    cmp al, 'e'
    je echo
    jmp halt
poweroff:
    lea rsi, [rip + s_off]
    call puts
    mov dx, 0x600
    mov al, 0x34
    out dx, al
    jmp halt
kbdreset:
    cmp qword ptr [0x5000], 2
    jae poweroff
    mov al, 0xfe
    out 0x64, al
    jmp halt
acpireset:
    cmp qword ptr [0x5000], 2
    jae poweroff
    mov dx, 0x602
    mov al, 1
    out dx, al
    jmp halt
triple:
    cmp qword ptr [0x5000], 2
    jae poweroff
    lidt [rip + null_idt]
    ud2
counter:
    xor ebx, ebx
1:
    lea rsi, [rip + s_tick]
    call puts
    mov eax, ebx
    shr eax, 8
    call puthex
    mov eax, ebx
    call puthex
    mov al, 10
    call putc
    inc ebx
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov rdi, rax
    add rdi, 0x4000000
2:
    pause
    rdtsc
    shl rdx, 32
    or rax, rdx
    cmp rax, rdi
    jb 2b
    jmp 1b
echo:
    lea rsi, [rip + s_echo]
    call puts
3:
    mov dx, 0x3fd
    in al, dx
    test al, 1
    jz 3b
    mov dx, 0x3f8
    in al, dx
    cmp al, 'q'
    je poweroff
    cmp al, 'a'
    jb 4f
    cmp al, 'z'
    ja 4f
    sub al, 32
4:
    call putc
    jmp 3b
halt:
    hlt
    jmp halt

/* putc: al -> COM1 */
putc:
    push rdx
    mov dx, 0x3f8
    out dx, al
    pop rdx
    ret
/* puts: NUL-terminated string at rsi */
puts:
    lodsb
    test al, al
    jz 5f
    call putc
    jmp puts
5:
    ret
/* puthex: al as two hex digits */
puthex:
    push rax
    shr al, 4
    call hexdigit
    pop rax
    push rax
    and al, 15
    call hexdigit
    pop rax
    ret
hexdigit:
    and al, 15
    cmp al, 10
    jb 6f
    add al, 'A' - 10
    jmp putc
6:
    add al, '0'
    jmp putc

.balign 8
null_idt:
    .word 0
    .quad 0
s_boot: .asciz "BOOT "
s_cmos: .asciz "CMOS OK "
s_cmosbad: .asciz "CMOS BAD\n"
s_off: .asciz "POWEROFF\n"
s_tick: .asciz "TICK "
s_echo: .asciz "ECHO READY\n"
