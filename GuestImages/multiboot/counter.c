/* counter.elf: prints 1, 2, 3, ... one number per TSC-paced step.
 * Command line: count=N (0 = forever, default 0), ticks=T (default 2000000),
 * beacon_token=N and beacon_count=N (see README.md).
 * Used to prove that snapshot/migration neither loses nor repeats a step. */
#include "lib.h"

/* In memory, so a snapshot captures it with the rest of the guest. */
static volatile uint64_t counter;

static int bad(const struct token *t, const char *what)
{
    puts("counter: ");
    puts(what);
    puts(" ");
    putn(t->s, t->len);
    puts("\n");
    return 2;
}

int kmain(uint32_t magic, const struct mb_info *mbi)
{
    uint64_t count = 0, ticks = 2000000, deadline;
    const char *p;
    struct token t;

    if (magic != MB_BOOT_MAGIC) {
        puts("bad magic\n");
        return 1;
    }
    p = cmdline_start(mbi);
    while (next_token(&p, &t)) {
        if (key_is(&t, "count")) {
            if (!parse_dec(&t, &count))
                return bad(&t, "bad value");
        } else if (key_is(&t, "ticks")) {
            if (!parse_dec(&t, &ticks))
                return bad(&t, "bad value");
        } else if (beacon_param(&t) < 0)
            return bad(&t, "bad value");
        /* anything else (e.g. tsc_khz=) is not ours: ignore it */
    }

    puts("counter start\n");
    beacon_start();
    deadline = rdtsc();
    for (;;) {
        /* Deadlines advance by exactly T, so the pace does not drift; if the
         * TSC jumps we catch up, still one number per iteration. */
        deadline += ticks;
        for (;;) {
            uint64_t now = rdtsc();

            beacon_poll(now);
            if (now >= deadline)
                break;
        }
        counter = counter + 1;
        putdec(counter);
        putc('\n');
        if (count && counter >= count)
            return 0;
    }
}
