# status42.bin: flat protected-mode image that only exits with status 42.
        .code32
        .text
        .globl _start
_start:
        mov     $42, %al
        out     %al, $0xf4
1:      cli                     # no exit device: halt forever
        hlt
        jmp     1b
