/* dirtier.elf: migration benchmark workload. Rewrites a working set of pages
 * at a chosen rate and prints a '.' every mark period. See README.md.
 *
 * By default the working set holds zeros and one 8-byte word per page, which a
 * sender that compressed or delta-encoded pages would move for almost nothing.
 * fill=random and fill=text give the set real contents first (incompressible,
 * or text-like), and each write then changes a few bytes of a page, so that
 * benchmark numbers are those a real guest would see. store=byte is the
 * tightest loop a guest can run: one byte per page, nothing else. */
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

enum fill { FILL_ZERO, FILL_RANDOM, FILL_TEXT };

/* A text-like byte: letters in short words, spaces, now and then a newline. */
static uint8_t text_byte(uint32_t *rng)
{
    uint32_t r = xorshift32(rng) & 63;

    if (r < 9)
        return ' ';
    if (r == 9)
        return '\n';
    return (uint8_t)('a' + (r - 10) % 26);
}

/* The fill copies each page from a random window of a 64 KiB pool with one
 * `rep movsl`: here each single store of the guest may trap, while a string
 * move runs at the host's pace. */
#define POOL_WORDS 16384u
/* The pool lives just below the working set, not in .bss: crt0 clears .bss at
 * every boot, and 64 KiB more of it would be written by every dirtier, filled
 * or not (on kvm_pvm the dirty ring then fills before the workload starts). */
#define POOL_BASE (WS_BASE - POOL_WORDS * 4u)
#define pool ((uint32_t *)(uintptr_t)POOL_BASE)

static void copy_words(volatile void *dst, const void *src, uint32_t n)
{
    __asm__ volatile("rep movsl" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
}

/* Gives every page of the set its contents before the writes begin. */
static void fill_set(enum fill fill, uint32_t npages, uint32_t *rng)
{
    uint32_t page, i;

    for (i = 0; i < POOL_WORDS; i++) {
        if (fill == FILL_RANDOM) {
            pool[i] = xorshift32(rng);
        } else {
            uint32_t v = text_byte(rng);
            v |= (uint32_t)text_byte(rng) << 8;
            v |= (uint32_t)text_byte(rng) << 16;
            v |= (uint32_t)text_byte(rng) << 24;
            pool[i] = v;
        }
    }
    for (page = 0; page < npages; page++) {
        uint32_t at = xorshift32(rng) % (POOL_WORDS - PAGE_SIZE / 4);
        volatile uint32_t *w = (volatile uint32_t *)(uintptr_t)(WS_BASE + page * PAGE_SIZE);

        copy_words(w, &pool[at], PAGE_SIZE / 4);
        /* No two pages alike, whatever windows they got: the first word holds
         * the page number, mixed (random) or as four letters (text). */
        if (fill == FILL_RANDOM)
            w[0] ^= page * 2654435761u;
        else
            w[0] = (uint32_t)('a' + page % 26) | (uint32_t)('a' + page / 26 % 26) << 8 |
                   (uint32_t)('a' + page / 676 % 26) << 16 | (uint32_t)('a' + page / 17576 % 26) << 24;
        if (!(page & 63))
            beacon_poll(rdtsc());
    }
}

/* One write of the filled modes: `touch` bytes at random offsets of the page
 * take new values of the same kind as the fill (no read first: a store is
 * what dirties the page, and a read may cost as much as the store). */
static void touch_page(enum fill fill, uint32_t page, uint32_t touch, uint32_t *rng)
{
    volatile uint8_t *b = (volatile uint8_t *)(uintptr_t)(WS_BASE + page * PAGE_SIZE);
    uint32_t k;

    for (k = 0; k < touch; k++) {
        uint32_t r = xorshift32(rng);
        uint8_t v = fill == FILL_RANDOM ? (uint8_t)(r >> 24) : text_byte(rng);

        b[r & (PAGE_SIZE - 1)] = v;
    }
}

/* Every report period: the page writes per second achieved since the last
 * report, as `\nrate=N\n` (no '.', which the harness counts as a mark). */
static uint64_t next_report, report_ticks, report_writes, khz;

static void report(uint64_t now, uint64_t writes)
{
    uint64_t elapsed;

    if (now < next_report)
        return;
    elapsed = now - (next_report - report_ticks);
    puts("\nrate=");
    /* writes / (elapsed / tsc_hz), in ms of TSC time so that it stays in 32 bits. */
    elapsed = div64(elapsed, 1000, NULL);
    putdec(div64((writes - report_writes) * khz, (uint32_t)(elapsed ? elapsed : 1), NULL));
    puts("\n");
    report_writes = writes;
    next_report = now + report_ticks;
}

int kmain(uint32_t magic, const struct mb_info *mbi)
{
    uint64_t pages = 1024, rate = 0, tsc_khz = 0, mark_us = 1000, passes = 0, touch = 4, report_ms = 0;
    uint64_t v, pass, deadline, ticks_per_page = 0, top, writes = 0;
    uint32_t rng = 0x2545F491u, fill_rng = 0x9E3779B9u, npages, i, page;
    int random = 0, have_khz = 0, r, byte_store = 0;
    enum fill fill = FILL_ZERO;
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
        else if (key_is(&t, "touch"))
            dst = &touch;
        else if (key_is(&t, "report_ms"))
            dst = &report_ms;
        else if (key_is(&t, "fill")) {
            if (val_is(&t, "zero"))
                fill = FILL_ZERO;
            else if (val_is(&t, "random"))
                fill = FILL_RANDOM;
            else if (val_is(&t, "text"))
                fill = FILL_TEXT;
            else
                return fail("bad value", &t);
            continue;
        } else if (key_is(&t, "store")) {
            if (val_is(&t, "word"))
                byte_store = 0;
            else if (val_is(&t, "byte"))
                byte_store = 1;
            else
                return fail("bad value", &t);
            continue;
        }
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
        if (!parse_dec(&t, &v) || (dst == &pages && v == 0) || (dst == &touch && (v == 0 || v > PAGE_SIZE)))
            return fail("bad value", &t);
        *dst = v;
    }
    if ((rate || mark_us || report_ms) && (!have_khz || !tsc_khz))
        return fail("tsc_khz= is required when rate, mark_us or report_ms is set", NULL);
    if (byte_store && fill != FILL_ZERO)
        return fail("store=byte writes one byte and needs fill=zero", NULL);

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
    puts(fill == FILL_RANDOM ? " fill=random" : fill == FILL_TEXT ? " fill=text" : " fill=zero");
    if (fill != FILL_ZERO) {
        puts(" touch=");
        putdec(touch);
    }
    puts(byte_store ? " store=byte" : " store=word");
    puts("\n");

    beacon_start();
    if (fill != FILL_ZERO) {
        uint64_t t0 = rdtsc();

        fill_set(fill, npages, &fill_rng);
        puts("dirtier filled ");
        putdec(npages);
        puts(" pages");
        if (tsc_khz) {
            puts(" in ");
            putdec(div64(rdtsc() - t0, (uint32_t)tsc_khz, NULL));
            puts(" ms");
        }
        puts("\n");
    }
    khz = tsc_khz;
    report_ticks = report_ms * tsc_khz;
    deadline = rdtsc();
    next_mark = deadline + mark_ticks;
    next_report = deadline + report_ticks;
    if (byte_store && !rate && !mark_ticks && !report_ticks) {
        /* The hot sweep: one byte per page in a tight loop, as fast as the
         * guest can go; the beacons are polled once per 4096 writes. */
        for (pass = 0; !passes || pass < passes; pass++) {
            uint8_t b = (uint8_t)(pass + 1);

            for (i = 0; i < npages; i++) {
                if (!(i & 4095))
                    beacon_poll(rdtsc());
                *(volatile uint8_t *)(uintptr_t)(WS_BASE + i * PAGE_SIZE) = b;
            }
        }
        goto done;
    }
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
                    if (now >= deadline) {
                        if (report_ticks)
                            report(now, writes);
                        break;
                    }
                }
            } else if (mark_ticks) {
                uint64_t now = rdtsc();
                mark(now);
                beacon_poll(now);
                if (report_ticks)
                    report(now, writes);
            } else if (!(i & 63)) {
                /* No TSC read otherwise (it may exit to the host): every 64 writes. */
                uint64_t now = rdtsc();
                beacon_poll(now);
                if (report_ticks)
                    report(now, writes);
            }
            if (fill != FILL_ZERO)
                touch_page(fill, page, (uint32_t)touch, &rng);
            else if (byte_store)
                *(volatile uint8_t *)(uintptr_t)(WS_BASE + page * PAGE_SIZE + slot) = (uint8_t)(pass + 1);
            else
                *(volatile uint64_t *)(uintptr_t)(WS_BASE + page * PAGE_SIZE + slot) = hi | page;
            if (report_ticks)
                writes++;   /* only when reported: no extra store in the hot loop otherwise */
        }
    }
done:
    puts("\ndirtier done passes=");
    putdec(passes);
    puts("\n");
    return 0;
}
