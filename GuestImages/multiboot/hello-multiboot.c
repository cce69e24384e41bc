/* hello-multiboot.elf: prints what the Multiboot loader told us. */
#include "lib.h"

int kmain(uint32_t magic, const struct mb_info *mbi)
{
    if (magic != MB_BOOT_MAGIC) {
        puts("bad magic\n");
        return 1;
    }
    puts("Hello from multiboot\n");
    if (mbi->flags & MBI_MEM) {
        puts("mem_lower=");
        putdec(mbi->mem_lower);
        puts(" mem_upper=");
        putdec(mbi->mem_upper);
        puts("\n");
    }
    if ((mbi->flags & MBI_CMDLINE) && mbi->cmdline) {
        puts("cmdline=");
        puts((const char *)(uintptr_t)mbi->cmdline);
        puts("\n");
    }
    if (mbi->flags & MBI_MMAP) {
        uint32_t off = 0;

        while (off + sizeof(struct mb_mmap) <= mbi->mmap_length) {
            const struct mb_mmap *e =
                (const struct mb_mmap *)(uintptr_t)(mbi->mmap_addr + off);
            puts("mmap ");
            puthex(e->base);
            puts(" ");
            puthex(e->length);
            puts(" ");
            putdec(e->type);
            puts("\n");
            off += e->size + sizeof e->size;
        }
    }
    return 0;
}
