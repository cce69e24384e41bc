# triplefault.bin: flat protected-mode image. With an empty IDT the #UD from
# ud2 cannot be delivered (#GP, then #DF), so the CPU shuts down. (ud2, not
# int3: under nested KVM here, QEMU reset the guest on the int3 variant.)
        .code32
        .text
        .globl _start
_start:
        lidt    idt_empty
        ud2
1:      cli                     # not reached on a real CPU
        hlt
        jmp     1b

        .balign 8
idt_empty:
        .word   0               # limit 0: no vector is valid
        .long   0
