/* Serial output, exit, number formatting and command-line parsing. */
#include "lib.h"

#define COM1     0x3f8
#define COM1_LSR (COM1 + 5)
#define LSR_THRE 0x20
#define EXIT_PORT 0xf4

void putc(char c)
{
    while (!(inb(COM1_LSR) & LSR_THRE))
        ;
    outb(COM1, (uint8_t)c);
}

void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

void putn(const char *s, size_t n)
{
    while (n--)
        putc(*s++);
}

uint64_t div64(uint64_t n, uint32_t d, uint32_t *rem)
{
    /* Long division in two divl steps: high word first, its remainder
     * becomes the top half of the second dividend so divl cannot overflow. */
    uint32_t hi = (uint32_t)(n >> 32), lo = (uint32_t)n, qhi, qlo, r;
    __asm__("divl %4" : "=a"(qhi), "=d"(r) : "a"(hi), "d"(0u), "rm"(d));
    __asm__("divl %4" : "=a"(qlo), "=d"(r) : "a"(lo), "d"(r), "rm"(d));
    if (rem)
        *rem = r;
    return ((uint64_t)qhi << 32) | qlo;
}

void putdec(uint64_t v)
{
    char buf[21];
    int i = sizeof buf;
    uint32_t r;

    buf[--i] = 0;
    do {
        v = div64(v, 10, &r);
        buf[--i] = (char)('0' + r);
    } while (v);
    puts(&buf[i]);
}

void puthex(uint64_t v)
{
    int shift = 60;

    puts("0x");
    while (shift > 0 && !((v >> shift) & 0xf))
        shift -= 4;
    for (; shift >= 0; shift -= 4)
        putc("0123456789abcdef"[(v >> shift) & 0xf]);
}

void guest_exit(uint8_t status)
{
    outb(EXIT_PORT, status);
    for (;;)        /* no exit device: stop here (status 0 by convention) */
        __asm__ volatile("cli; hlt");
}

const char *cmdline_start(const struct mb_info *mbi)
{
    const char *p, *q;
    struct token t;

    if (!(mbi->flags & MBI_CMDLINE) || !mbi->cmdline)
        return "";
    p = q = (const char *)(uintptr_t)mbi->cmdline;
    if (next_token(&q, &t) && !t.val)
        p = q;      /* GRUB-style "/boot/kernel args...": skip the path */
    return p;
}

int next_token(const char **p, struct token *t)
{
    const char *s = *p;
    size_t i;

    while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r')
        s++;
    if (!*s)
        return 0;
    t->s = s;
    t->val = NULL;
    t->vlen = 0;
    for (i = 0; s[i] && s[i] != ' ' && s[i] != '\t' && s[i] != '\n' && s[i] != '\r'; i++)
        if (s[i] == '=' && !t->val) {
            t->klen = i;
            t->val = s + i + 1;
        }
    t->len = i;
    if (t->val)
        t->vlen = (size_t)(s + i - t->val);
    else
        t->klen = i;
    *p = s + i;
    return 1;
}

static int span_is(const char *a, size_t n, const char *b)
{
    size_t i;

    for (i = 0; i < n; i++)
        if (b[i] != a[i])       /* also stops at b's NUL */
            return 0;
    return b[n] == 0;
}

int key_is(const struct token *t, const char *key)
{
    return t->val && span_is(t->s, t->klen, key);
}

int val_is(const struct token *t, const char *s)
{
    return t->val && span_is(t->val, t->vlen, s);
}

int parse_dec(const struct token *t, uint64_t *out)
{
    uint64_t v = 0;
    size_t i;

    if (!t->val || !t->vlen)
        return 0;
    for (i = 0; i < t->vlen; i++) {
        unsigned d = (unsigned)(t->val[i] - '0');
        /* constant bounds only: no 64-bit division in 32-bit code */
        if (d > 9 || v > UINT64_MAX / 10 ||
            (v == UINT64_MAX / 10 && d > UINT64_MAX % 10))
            return 0;
        v = v * 10 + d;
    }
    *out = v;
    return 1;
}

_Static_assert(offsetof(struct beacon_block, token) == 0x08, "beacon layout");
_Static_assert(offsetof(struct beacon_block, interval_ms) == 0x10, "beacon layout");
_Static_assert(offsetof(struct beacon_block, msg_token) == 0x18, "beacon layout");
_Static_assert(offsetof(struct beacon_block, msg_counter) == 0x20, "beacon layout");

/* Beacon state lives in .bss/.data, so a snapshot carries it along. */
uint64_t beacon_deadline = UINT64_MAX;
static uint64_t beacon_ticks;           /* interval in TSC ticks */
static uint64_t beacon_sent;            /* last counter sent: 1, 2, 3, ... */
static uint64_t beacon_limit;           /* beacon_count=; 0 = no limit */
static uint64_t beacon_fake_token;      /* beacon_token= */
static int beacon_fake;
static uint16_t beacon_port;

int beacon_param(const struct token *t)
{
    uint64_t *dst;

    if (key_is(t, "beacon_token"))
        dst = &beacon_fake_token, beacon_fake = 1;
    else if (key_is(t, "beacon_count"))
        dst = &beacon_limit;
    else
        return 0;
    return parse_dec(t, dst) ? 1 : -1;
}

/* GCC treats a constant pointer below 4 KiB as null plus an offset and warns
 * (-Warray-bounds); hiding the value from it in a register avoids that. */
static volatile struct beacon_block *beacon_block(void)
{
    uintptr_t a = BEACON_ADDR;

    __asm__("" : "+r"(a));
    return (volatile struct beacon_block *)a;
}

static uint64_t add_sat(uint64_t a, uint64_t b)
{
    return a + b < a ? UINT64_MAX : a + b;
}

static void beacon_send(void)
{
    volatile struct beacon_block *b = beacon_block();
    uint64_t tok = beacon_fake_token, again;

    if (!beacon_fake) {
        /* Two 32-bit loads: read until two reads agree, in case the VMM
         * rewrites the token between the halves. */
        tok = b->token;
        while ((again = b->token) != tok)
            tok = again;
    }
    b->msg_token = tok;
    b->msg_counter = ++beacon_sent;
    /* The stores above must land before the VMM sees the out. */
    __asm__ volatile("outb %%al, %%dx" : : "a"(0), "d"(beacon_port) : "memory");
    if (beacon_limit && beacon_sent >= beacon_limit)
        beacon_deadline = UINT64_MAX;
}

void beacon_start(void)
{
    volatile struct beacon_block *b = beacon_block();
    uint32_t ms = b->interval_ms, khz = b->tsc_khz;

    if (b->magic != BEACON_MAGIC || b->version != BEACON_VERSION || !ms || !khz)
        return;                         /* no VMM block (e.g. QEMU): no beacons */
    beacon_port = b->port;
    beacon_ticks = (uint64_t)ms * khz;  /* kHz * ms = ticks; 32x32 multiply */
    beacon_deadline = add_sat(rdtsc(), beacon_ticks);
    beacon_send();
}

/* Deadline-based like the counter: the next deadline is one interval after
 * the previous one, so the period does not drift. After a stall longer than
 * an interval we send one beacon and restart the period from now instead
 * of a burst of stale ones. */
void beacon_due(uint64_t now)
{
    beacon_send();
    if (beacon_deadline == UINT64_MAX)
        return;                         /* beacon_count= reached */
    beacon_deadline = add_sat(beacon_deadline, beacon_ticks);
    if (beacon_deadline <= now)
        beacon_deadline = add_sat(now, beacon_ticks);
}
