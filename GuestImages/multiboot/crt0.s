# Multiboot v1 header and entry point shared by all Multiboot guests.
        .set    MB_MAGIC, 0x1BADB002
        .set    MB_FLAGS, 0x00000003    # bit 0: page-aligned modules, bit 1: memory info

        .section .multiboot, "a"        # linked first, so it is in the first 8 KiB
        .balign 4
        .long   MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

        .text
        .globl  _start
_start:
        cli
        cld
        mov     %eax, %edx              # rep stosb needs %eax
        # Zero .bss ourselves: the stack lives there and not every loader clears it.
        mov     $__bss_start, %edi
        mov     $__bss_end, %ecx
        sub     %edi, %ecx
        xor     %eax, %eax
        rep stosb
        mov     $stack_top, %esp        # the loader gives us no usable stack
        push    %ebx                    # multiboot info
        push    %edx                    # boot magic
        call    kmain                   # returns the exit status
        push    %eax
        call    guest_exit              # does not return

        .bss
        .balign 16
        .skip   16384
stack_top:
