# Mode switches for flatboot.elf. Each one sets up exactly the state the VMM
# documents for a flat image and jumps to it at 0x10000; none returns.
        .text
        .code32

# Real mode: drop to 16-bit protected mode, clear PE, then far-jump to 1000:0000.
        .globl  enter_real
enter_real:
        cli
        mov     $tramp16, %eax          # CODE16 base = tramp16, so offsets are 0-based
        mov     %ax, gdt + 0x18 + 2
        shr     $16, %eax
        mov     %al, gdt + 0x18 + 4
        mov     %ah, gdt + 0x18 + 7
        lgdt    gdt_desc
        ljmp    $0x18, $0
        .code16
tramp16:
        mov     $0x20, %ax              # 64 KiB data limits, as real mode expects
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %fs
        mov     %ax, %gs
        mov     %ax, %ss
        mov     %cr0, %eax
        and     $0xfffffffe, %eax
        mov     %eax, %cr0
        # Real mode now; CS keeps its cached base until the far jump below.
        xor     %ax, %ax
        mov     %ax, %ss
        mov     $0xfff0, %esp           # clear the high half too: lidt below uses %esp
        pushl   $0                      # IDTR = real-mode IVT (base 0, limit 0x3ff)
        pushw   $0x3ff
        lidt    %ss:(%esp)
        add     $6, %sp
        mov     $0x1000, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %fs
        mov     %ax, %gs
        mov     $0x7000, %si
        pushw   $2
        popfw
        ljmp    $0x1000, $0
        .code32

# Protected mode: flat code 0x08, data 0x10.
        .globl  enter_protected
enter_protected:
        cli
        lgdt    gdt_desc
        ljmp    $0x08, $1f
1:      mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %fs
        mov     %ax, %gs
        mov     %ax, %ss
        mov     $0x10000, %esp
        mov     $0x7000, %esi
        pushl   $2
        popfl
        ljmp    $0x08, $0x10000

# Long mode: code 0x08 (L=1), data 0x10; argument = physical PML4 address.
        .globl  enter_long
enter_long:
        cli
        mov     4(%esp), %ebx
        lgdt    gdt64_desc
        ljmp    $0x18, $1f              # 32-bit code selector of the 64-bit GDT
1:      mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %fs
        mov     %ax, %gs
        mov     %ax, %ss
        mov     %cr4, %eax
        or      $0x20, %eax             # PAE
        mov     %eax, %cr4
        mov     %ebx, %cr3
        mov     $0xc0000080, %ecx       # EFER.LME
        rdmsr
        or      $0x100, %eax
        wrmsr
        mov     %cr0, %eax
        or      $0x80000000, %eax       # PG: long mode becomes active
        mov     %eax, %cr0
        ljmp    $0x08, $2f
        .code64
2:      mov     $0x10000, %esp
        mov     $0x7000, %esi
        pushq   $2
        popfq
        mov     $0x10000, %eax
        jmp     *%rax
        .code32

        .data
        .balign 8
gdt:    .quad   0
        .quad   0x00cf9a000000ffff      # 0x08 code32 flat
        .quad   0x00cf92000000ffff      # 0x10 data flat
        .quad   0x00009a000000ffff      # 0x18 code16, base patched
        .quad   0x000092000000ffff      # 0x20 data16, base 0
gdt_end:
gdt64:  .quad   0
        .quad   0x00af9a000000ffff      # 0x08 code64
        .quad   0x00cf92000000ffff      # 0x10 data flat
        .quad   0x00cf9a000000ffff      # 0x18 code32 (for the switch)
gdt64_end:
        .balign 4
        .word   0
gdt_desc:
        .word   gdt_end - gdt - 1
        .long   gdt
        .word   0
gdt64_desc:
        .word   gdt64_end - gdt64 - 1
        .long   gdt64
