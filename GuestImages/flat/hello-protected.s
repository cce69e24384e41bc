# hello-protected.bin: flat 32-bit protected-mode image at 0x10000 (flat
# segments, ESP=0x10000, so the stack grows down below the image).
        .code32
        .text
        .globl _start
_start:
        cld
        mov     $msg, %esi
        call    puts
        xor     %eax, %eax
        jmp     exit

        .include "serial32.inc"

msg:    .asciz  "Hello from protected mode\n"
