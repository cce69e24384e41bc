/* dirtier.elf: migration benchmark workload. Rewrites a working set of pages
 * at a chosen rate and prints a '.' every mark period. See README.md. */
#include "lib.h"

#define WS_BASE   0x400000u        /* working set starts at 4 MiB */
#define PAGE_SIZE 4096u

static uint64_t next_mark, mark_ticks;

static int fail(const char *msg, const struct token *t)
{
    puts("dirtier: ");
    puts(msg);
    if (t) {
        puts(" ");
        putn(t->s, t->len);
    }
    puts("\n");
    return 2;
}

/* One '.' per elapsed mark period. After a long stall (e.g. a paused VM) we
 * emit one mark and restart the period instead of a burst of stale marks. */
static void mark(uint64_t now)
{
    if (now < next_mark)
        return;
    putc('.');
    next_mark += mark_ticks;
    if (next_mark <= now)
        next_mark = now + mark_ticks;
}

static uint32_t xorshift32(uint32_t *s)
{
    uint32_t x = *s;

    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

int kmain(uint32_t magic, const struct mb_info *mbi)
{
    uint64_t pages = 1024, rate = 0, tsc_khz = 0, mark_us = 1000, passes = 0;
    uint64_t v, pass, deadline, ticks_per_page = 0, top;
    uint32_t rng = 0x2545F491u, npages, i, page;
    int random = 0, have_khz = 0, r;
    const char *p;
    struct token t;

    if (magic != MB_BOOT_MAGIC) {
        puts("bad magic\n");
        return 1;
    }
    p = cmdline_start(mbi);
    while (next_token(&p, &t)) {
        uint64_t *dst = NULL;

        if (key_is(&t, "pages"))
            dst = &pages;
        else if (key_is(&t, "rate"))
            dst = &rate;
        else if (key_is(&t, "tsc_khz"))
            dst = &tsc_khz, have_khz = 1;
        else if (key_is(&t, "mark_us"))
            dst = &mark_us;
        else if (key_is(&t, "passes"))
            dst = &passes;
        else if ((r = beacon_param(&t)) != 0) {
            if (r < 0)
                return fail("bad value", &t);
            continue;
        } else if (key_is(&t, "pattern")) {
            if (val_is(&t, "seq"))
                random = 0;
            else if (val_is(&t, "random"))
                random = 1;
            else
                return fail("bad value", &t);
            continue;
        } else
            return fail("unknown parameter", &t);
        if (!parse_dec(&t, &v) || (dst == &pages && v == 0))
            return fail("bad value", &t);
        *dst = v;
    }
    if ((rate || mark_us) && (!have_khz || !tsc_khz))
        return fail("tsc_khz= is required when rate or mark_us is set", NULL);

    /* mem_upper counts KiB from 1 MiB; stay within it and below 4 GiB. */
    top = (mbi->flags & MBI_MEM) ? 0x100000u + (uint64_t)mbi->mem_upper * 1024 : 0;
    if (top > 0x100000000ull)
        top = 0x100000000ull;
    if (top < WS_BASE || pages > (top - WS_BASE) / PAGE_SIZE) {
        puts("dirtier: working set does not fit\n");
        return 2;
    }
    npages = (uint32_t)pages;     /* < 2^20 now */

    if (rate)
        ticks_per_page = div64(tsc_khz * 1000, rate > 0xffffffffu ? 0xffffffffu : (uint32_t)rate, NULL);
    mark_ticks = mark_us ? div64(tsc_khz * mark_us, 1000, NULL) : 0;

    puts("dirtier pages=");
    putdec(pages);
    puts(" rate=");
    putdec(rate);
    puts(random ? " pattern=random" : " pattern=seq");
    puts(" mark_us=");
    putdec(mark_us);
    puts("\n");

    beacon_start();
    deadline = rdtsc();
    next_mark = deadline + mark_ticks;
    for (pass = 0; !passes || pass < passes; pass++) {
        /* The slot moves with the pass and the value encodes (pass, page), never
         * zero, so every pass changes the contents of every page it writes. */
        uint32_t slot = (uint32_t)(pass & (PAGE_SIZE / 8 - 1)) * 8;
        uint64_t hi = (pass + 1) << 32;

        for (i = 0; i < npages; i++) {
            page = random ? xorshift32(&rng) % npages : i;
            if (rate) {
                deadline += ticks_per_page;
                for (;;) {
                    uint64_t now = rdtsc();
                    if (mark_ticks)
                        mark(now);
                    beacon_poll(now);
                    if (now >= deadline)
                        break;
                }
            } else if (mark_ticks) {
                uint64_t now = rdtsc();
                mark(now);
                beacon_poll(now);
            } else if (!(i & 63))
                beacon_poll(rdtsc());   /* no TSC read otherwise: every 64 writes */
            *(volatile uint64_t *)(uintptr_t)(WS_BASE + page * PAGE_SIZE + slot) = hi | page;
        }
    }
    puts("\ndirtier done passes=");
    putdec(passes);
    puts("\n");
    return 0;
}
