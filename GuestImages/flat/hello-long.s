# hello-long.bin: flat 64-bit image at 0x10000 (identity-mapped, RSP=0x10000,
# RSI=0x7000 = parameter block). Prints greeting, command line and memory size.
        .code64
        .text
        .globl _start
_start:
        cld
        mov     %rsi, %rbx              # keep the parameter block pointer
        lea     msg_hello(%rip), %rsi
        call    puts
        cmpl    $0x504D4D56, (%rbx)     # "VMMP"
        jne     bad
        mov     20(%rbx), %ecx          # command-line length
        test    %ecx, %ecx
        jz      1f
        lea     msg_cmd(%rip), %rsi
        call    puts
        mov     16(%rbx), %esi          # command-line address (32-bit)
        call    putn
        lea     msg_nl(%rip), %rsi
        call    puts
1:      lea     msg_mem(%rip), %rsi
        call    puts
        mov     8(%rbx), %rax
        shr     $20, %rax               # bytes -> MiB
        call    putdec
        lea     msg_mib(%rip), %rsi
        call    puts
        xor     %eax, %eax
        jmp     exit
bad:
        lea     msg_bad(%rip), %rsi
        call    puts
        mov     $3, %al
exit:
        out     %al, $0xf4
2:      cli                             # no exit device: halt forever
        hlt
        jmp     2b

# putc: write %al to COM1 once THR is empty. Clobbers %edx, %r8d.
putc:
        mov     %eax, %r8d
        mov     $0x3fd, %dx
3:      in      %dx, %al
        test    $0x20, %al
        jz      3b
        mov     %r8d, %eax
        mov     $0x3f8, %dx
        out     %al, %dx
        ret

# puts: NUL-terminated string at %rsi. Clobbers %rax, %rdx, %rsi, %r8.
puts:
        lodsb
        test    %al, %al
        jz      4f
        call    putc
        jmp     puts
4:      ret

# putn: %ecx bytes at %rsi. Clobbers %rax, %rcx, %rdx, %rsi, %r8.
putn:
        lodsb
        call    putc
        loop    putn
        ret

# putdec: unsigned decimal %rax. Digits are built backwards on the stack.
putdec:
        sub     $24, %rsp               # 20 digits max + NUL
        lea     23(%rsp), %rdi
        movb    $0, (%rdi)
        mov     $10, %ecx
5:      xor     %edx, %edx
        div     %rcx
        add     $'0', %dl
        dec     %rdi
        mov     %dl, (%rdi)
        test    %rax, %rax
        jnz     5b
        mov     %rdi, %rsi
        call    puts
        add     $24, %rsp
        ret

msg_hello:  .asciz "Hello from long mode\n"
msg_cmd:    .asciz "cmdline: "
msg_nl:     .asciz "\n"
msg_mem:    .asciz "memory: "
msg_mib:    .asciz " MiB\n"
msg_bad:    .asciz "bad parameter block\n"
