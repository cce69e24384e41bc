# hang.bin: flat protected-mode image that waits for an interrupt that never
# comes (no PIC/timer), so the VMM must detect it as a hang.
        .code32
        .text
        .globl _start
_start:
        cld
        mov     $msg, %esi
        call    puts
1:      sti
        hlt
        jmp     1b

        .include "serial32.inc"

msg:    .asciz  "hang\n"
