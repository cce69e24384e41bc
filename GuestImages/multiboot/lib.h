/* Tiny freestanding runtime shared by the Multiboot guests (32-bit). */
#ifndef GUEST_LIB_H
#define GUEST_LIB_H

#include <stddef.h>
#include <stdint.h>

#define MB_BOOT_MAGIC 0x2BADB002u

#define MBI_MEM     (1u << 0)
#define MBI_CMDLINE (1u << 2)
#define MBI_MODS    (1u << 3)
#define MBI_MMAP    (1u << 6)

struct mb_info {
    uint32_t flags;
    uint32_t mem_lower, mem_upper;      /* KiB below 1 MiB / above 1 MiB */
    uint32_t boot_device;
    uint32_t cmdline;
    uint32_t mods_count, mods_addr;
    uint32_t syms[4];
    uint32_t mmap_length, mmap_addr;
};

struct mb_module {
    uint32_t mod_start, mod_end, string, reserved;
};

/* mmap entries are variable-sized: 'size' does not count itself. */
struct __attribute__((packed)) mb_mmap {
    uint32_t size;
    uint64_t base, length;
    uint32_t type;
};

static inline void outb(uint16_t port, uint8_t v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline uint64_t rdtsc(void)
{
    uint64_t t;
    __asm__ volatile("rdtsc" : "=A"(t));
    return t;
}

void putc(char c);
void puts(const char *s);
void putn(const char *s, size_t n);
void putdec(uint64_t v);
void puthex(uint64_t v);
__attribute__((noreturn)) void guest_exit(uint8_t status);

/* 64-by-32 division without libgcc; *rem may be NULL. */
uint64_t div64(uint64_t n, uint32_t d, uint32_t *rem);

/* One space-separated command-line token, split at its first '='. */
struct token {
    const char *s;          /* whole token */
    size_t len;
    const char *val;        /* after '='; NULL if there is none */
    size_t vlen;
    size_t klen;            /* key length (whole token if no '=') */
};

/* Skips a leading loader-supplied kernel path (first token without '='). */
const char *cmdline_start(const struct mb_info *mbi);
int next_token(const char **p, struct token *t);
int key_is(const struct token *t, const char *key);
int val_is(const struct token *t, const char *s);
int parse_dec(const struct token *t, uint64_t *out);

/* Beacons (see README.md): the VMM writes a block at 0x0F00; the guest
 * answers with a token and a counter written back into it, then an outb. */
#define BEACON_ADDR    0x0F00u
#define BEACON_MAGIC   0x314E4342u     /* "BCN1" */
#define BEACON_VERSION 1u

struct beacon_block {
    uint32_t magic;
    uint16_t version;
    uint16_t port;
    uint64_t token;                     /* VMM: may change at any time */
    uint32_t interval_ms;
    uint32_t tsc_khz;
    uint64_t msg_token;                 /* guest */
    uint64_t msg_counter;               /* guest */
};

/* TSC deadline of the next beacon; UINT64_MAX when none is due (disabled,
 * or beacon_count= reached). Polling costs one compare. */
extern uint64_t beacon_deadline;

/* beacon_token= and beacon_count=: 1 if taken, -1 on a bad value, 0 if the
 * token is not a beacon key. */
int beacon_param(const struct token *t);
/* Reads the block, and if it is valid sends the first beacon now. */
void beacon_start(void);
void beacon_due(uint64_t now);

static inline void beacon_poll(uint64_t now)
{
    if (now >= beacon_deadline)
        beacon_due(now);
}

#endif
