# hello-real.bin: flat real-mode image. The VMM loads it at 0x10000 and enters
# at 1000:0000 with DS=0x1000, so we link at 0 and offsets are image offsets.
        .code16
        .text
        .globl _start
_start:
        cld
        mov     $msg, %si       # SI held the parameter block; we do not need it
next:
        lodsb
        test    %al, %al
        jz      done
        mov     %al, %bl
        mov     $0x3fd, %dx     # COM1 LSR: wait for THR empty (bit 5)
wait:
        in      %dx, %al
        test    $0x20, %al
        jz      wait
        mov     %bl, %al
        mov     $0x3f8, %dx
        out     %al, %dx
        jmp     next
done:
        cli                     # exit status 0 by convention
        hlt
        jmp     done

msg:    .asciz  "Hello from real mode\n"
