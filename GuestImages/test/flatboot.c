/* flatboot.elf: test-only Multiboot shim that boots a flat image (given as
 * the first module, e.g. QEMU -initrd) the way our VMM does: copies it to
 * 0x10000, writes the parameter block at 0x7000 and enters the image in
 * real, protected or long mode with the documented register state.
 * Command line: mode=real|protected|long [badmagic=1] [-- guest cmdline] */
#include "lib.h"

#define IMAGE_BASE  0x10000u
#define IMAGE_MAX   0x80000u        /* up to 0x90000: stay in low RAM */
#define PARAMS      0x7000u
#define GUEST_CMD   0x7100u
#define GUEST_CMD_MAX 0xe00u

void enter_real(void);
void enter_protected(void);
void enter_long(uint32_t cr3);

/* Identity map of the low 4 GiB with 2 MiB pages, as the VMM provides. */
static uint64_t pml4[512] __attribute__((aligned(4096)));
static uint64_t pdpt[512] __attribute__((aligned(4096)));
static uint64_t pd[4][512] __attribute__((aligned(4096)));

static int fail(const char *msg)
{
    puts("flatboot: ");
    puts(msg);
    puts("\n");
    return 1;
}

int kmain(uint32_t magic, const struct mb_info *mbi)
{
    const struct mb_module *mod;
    const char *p, *guest = "";
    struct token t;
    int mode = -1, badmagic = 0;
    uint32_t size, len, i, j;
    uint8_t *dst;

    if (magic != MB_BOOT_MAGIC)
        return fail("bad magic");
    p = cmdline_start(mbi);
    while (next_token(&p, &t)) {
        if (t.len == 2 && t.s[0] == '-' && t.s[1] == '-') {
            while (*p == ' ')
                p++;
            guest = p;
            break;
        }
        if (key_is(&t, "mode"))
            mode = val_is(&t, "real") ? 0 : val_is(&t, "protected") ? 1 :
                   val_is(&t, "long") ? 2 : -1;
        else if (key_is(&t, "badmagic"))
            badmagic = 1;
    }
    if (mode < 0)
        return fail("need mode=real|protected|long");
    if (!(mbi->flags & MBI_MODS) || !mbi->mods_count)
        return fail("no module (flat image) given");
    mod = (const struct mb_module *)(uintptr_t)mbi->mods_addr;
    size = mod->mod_end - mod->mod_start;
    if (size > IMAGE_MAX)
        return fail("image too large");

    dst = (uint8_t *)IMAGE_BASE;
    for (i = 0; i < size; i++)
        dst[i] = ((const uint8_t *)(uintptr_t)mod->mod_start)[i];

    dst = (uint8_t *)PARAMS;
    for (i = 0; i < GUEST_CMD + GUEST_CMD_MAX - PARAMS; i++)
        dst[i] = 0;
    for (len = 0; guest[len] && len < GUEST_CMD_MAX - 1; len++)
        ((char *)GUEST_CMD)[len] = guest[len];
    *(volatile uint32_t *)(PARAMS + 0) = badmagic ? 0xdeadbeefu : 0x504D4D56u;
    *(volatile uint32_t *)(PARAMS + 4) = 1;
    /* RAM size: QEMU reserves a little below the top, so round up to 1 MiB. */
    *(volatile uint64_t *)(PARAMS + 8) = (mbi->flags & MBI_MEM) ?
        (0x100000u + (uint64_t)mbi->mem_upper * 1024 + 0xfffff) & ~0xfffffull : 0;
    *(volatile uint32_t *)(PARAMS + 16) = GUEST_CMD;
    *(volatile uint32_t *)(PARAMS + 20) = len;

    /* QEMU's PC has a PIC with the BIOS timer unmasked; our VMM has none.
     * Mask it so hang.bin's sti; hlt really waits forever. */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);

    if (mode == 0)
        enter_real();
    if (mode == 1)
        enter_protected();
    for (i = 0; i < 4; i++) {
        pdpt[i] = (uint32_t)(uintptr_t)pd[i] | 3;        /* present, writable */
        for (j = 0; j < 512; j++)
            pd[i][j] = ((uint64_t)(i * 512 + j) << 21) | 0x83;  /* + 2 MiB page */
    }
    pml4[0] = (uint32_t)(uintptr_t)pdpt | 3;
    enter_long((uint32_t)(uintptr_t)pml4);
    return 1;
}
