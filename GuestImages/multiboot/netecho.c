/* netecho.elf: a network guest on a legacy virtio-net PCI card.
 * Command line: ip=A.B.C.D/NN (required), port=P (UDP echo port, default 7),
 * beacon_token=N and beacon_count=N (see README.md).
 *
 * Finds 1AF4:1000 on PCI bus 0 (configuration mechanism #1), takes its I/O
 * BAR, resets it, accepts VIRTIO_NET_F_MAC, places a receive and a transmit
 * queue in its own memory (legacy layout), posts receive buffers, sets
 * DRIVER_OK and prints "netecho mac=... ip=... port=...". Then it polls the
 * used rings (no interrupts) and answers ARP requests for its address, ICMP
 * echo requests (ping) and UDP datagrams to its port (sent back as they came).
 * It runs until stopped; status 2 if the card is missing or broken. */
#include "lib.h"

static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline uint16_t inw(uint16_t port) { uint16_t v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint32_t inl(uint16_t port) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
#define barrier() __asm__ volatile("" : : : "memory")

/* Legacy virtio PCI registers (offsets in BAR0). */
#define VIRTIO_HOST_FEATURES  0x00
#define VIRTIO_GUEST_FEATURES 0x04
#define VIRTIO_QUEUE_PFN      0x08
#define VIRTIO_QUEUE_SIZE     0x0C
#define VIRTIO_QUEUE_SEL      0x0E
#define VIRTIO_QUEUE_NOTIFY   0x10
#define VIRTIO_STATUS         0x12
#define VIRTIO_ISR            0x13
#define VIRTIO_NET_MAC        0x14

#define ST_ACK        1
#define ST_DRIVER     2
#define ST_DRIVER_OK  4
#define ST_NEEDS_RESET 0x40
#define ST_FAILED     0x80
#define F_MAC         (1u << 5)

#define DESC_NEXT  1
#define DESC_WRITE 2

#define QMAX     256            /* largest queue this driver lays out */
#define QBYTES   (3 * 4096 + 4096)
#define NRX      32             /* receive buffers posted */
#define NTX      16             /* transmit buffers */
#define BUFLEN   2048
#define HDRLEN   10             /* legacy virtio_net_hdr, no mergeable buffers */

struct desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct used_elem { uint32_t id, len; };

struct queue {
    uint16_t size, last_used, avail_idx;
    volatile struct desc *desc;
    volatile uint16_t *avail;   /* flags, idx, ring[size], used_event */
    volatile uint16_t *used;    /* flags, idx, then elements */
};

static uint8_t qmem[2][QBYTES] __attribute__((aligned(4096)));
static uint8_t rxbuf[NRX][BUFLEN] __attribute__((aligned(16)));
static uint8_t txbuf[NTX][BUFLEN] __attribute__((aligned(16)));
static struct queue rxq, txq;
static uint16_t io;
static uint8_t mac[6];
static uint8_t myip[4];
static uint16_t udp_port = 7;
static uint32_t tx_sent;

static uint32_t pci_read(int dev, int reg)
{
    outl(0xCF8, 0x80000000u | (uint32_t)dev << 11 | (uint32_t)(reg & 0xFC));
    return inl(0xCFC);
}

static void pci_write(int dev, int reg, uint32_t v)
{
    outl(0xCF8, 0x80000000u | (uint32_t)dev << 11 | (uint32_t)(reg & 0xFC));
    outl(0xCFC, v);
}

static volatile struct used_elem *used_ring(struct queue *q)
{
    return (volatile struct used_elem *)(q->used + 2);
}

static int setup_queue(int index, struct queue *q)
{
    uint8_t *base = qmem[index];
    uint32_t avail_end;

    outw(io + VIRTIO_QUEUE_SEL, (uint16_t)index);
    q->size = inw(io + VIRTIO_QUEUE_SIZE);
    if (!q->size || q->size > QMAX || (q->size & (q->size - 1)))
        return 0;
    q->desc = (volatile struct desc *)base;
    q->avail = (volatile uint16_t *)(base + 16u * q->size);
    avail_end = 16u * q->size + 6u + 2u * q->size;
    q->used = (volatile uint16_t *)(base + ((avail_end + 4095u) & ~4095u));
    q->last_used = q->avail_idx = 0;
    outl(io + VIRTIO_QUEUE_PFN, (uint32_t)(uintptr_t)base >> 12);
    return 1;
}

static void rx_post(uint16_t id)
{
    rxq.avail[2 + rxq.avail_idx % rxq.size] = id;
    barrier();
    rxq.avail[1] = ++rxq.avail_idx;
}

static int broken(void)
{
    return inb(io + VIRTIO_STATUS) & (ST_NEEDS_RESET | ST_FAILED);
}

/* Sends len bytes already in txbuf[slot] after the header; waits for the
 * device to give the buffer back before the slot is used again. */
static void tx_send(uint32_t slot, uint32_t len)
{
    uint16_t id = (uint16_t)(slot % NTX);

    txq.desc[id].addr = (uint32_t)(uintptr_t)txbuf[id];
    txq.desc[id].len = HDRLEN + len;
    txq.desc[id].flags = 0;
    txq.desc[id].next = 0;
    txq.avail[2 + txq.avail_idx % txq.size] = id;
    barrier();
    txq.avail[1] = ++txq.avail_idx;
    barrier();
    outw(io + VIRTIO_QUEUE_NOTIFY, 1);
    tx_sent++;
    /* At most NTX in flight: wait until the oldest slot is back. */
    while ((uint16_t)(tx_sent - txq.used[1]) >= NTX && !broken())
        ;
}

static uint8_t *tx_frame(void)
{
    uint8_t *b = txbuf[tx_sent % NTX];
    int i;

    for (i = 0; i < HDRLEN; i++)
        b[i] = 0;
    return b + HDRLEN;
}

static void copy(uint8_t *d, const uint8_t *s, uint32_t n) { while (n--) *d++ = *s++; }
static int same(const uint8_t *a, const uint8_t *b, uint32_t n) { while (n--) if (*a++ != *b++) return 0; return 1; }
static uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }

static uint16_t checksum(const uint8_t *p, uint32_t n)
{
    uint32_t sum = 0;

    for (; n > 1; p += 2, n -= 2)
        sum += be16(p);
    if (n)
        sum += (uint32_t)p[0] << 8;
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (uint16_t)~sum;
}

static void arp(const uint8_t *f, uint32_t len)
{
    uint8_t *r;

    if (len < 42 || be16(f + 14) != 1 || be16(f + 16) != 0x0800 || f[18] != 6 || f[19] != 4 ||
        be16(f + 20) != 1 || !same(f + 38, myip, 4))
        return;
    r = tx_frame();
    copy(r, f + 6, 6);          /* to the asker */
    copy(r + 6, mac, 6);
    put16(r + 12, 0x0806);
    put16(r + 14, 1);
    put16(r + 16, 0x0800);
    r[18] = 6;
    r[19] = 4;
    put16(r + 20, 2);           /* reply */
    copy(r + 22, mac, 6);
    copy(r + 28, myip, 4);
    copy(r + 32, f + 22, 10);   /* their MAC and IP */
    tx_send(tx_sent, 42);
}

/* Answers an ICMP echo request or a UDP datagram to our port with the same
 * payload, addresses swapped. */
static void ipv4(const uint8_t *f, uint32_t len)
{
    const uint8_t *ip = f + 14;
    uint32_t ihl, total;
    uint8_t *r, *rip, *l4;

    if (len < 34 || (ip[0] >> 4) != 4 || !same(ip + 16, myip, 4))
        return;
    ihl = (uint32_t)(ip[0] & 0xF) * 4;
    total = be16(ip + 2);
    if (ihl < 20 || total < ihl || 14 + total > len || total > BUFLEN - HDRLEN - 14)
        return;
    if (be16(ip + 6) & 0x3FFF)
        return;                 /* fragments: not ours to reassemble */
    r = tx_frame();
    copy(r, f + 6, 6);
    copy(r + 6, mac, 6);
    put16(r + 12, 0x0800);
    rip = r + 14;
    copy(rip, ip, total);
    copy(rip + 12, ip + 16, 4);
    copy(rip + 16, ip + 12, 4);
    rip[8] = 64;
    l4 = rip + ihl;
    if (ip[9] == 1) {
        if (total - ihl < 8 || l4[0] != 8)
            return;
        l4[0] = 0;              /* echo reply */
        put16(l4 + 2, 0);
        put16(l4 + 2, checksum(l4, total - ihl));
    } else if (ip[9] == 17) {
        if (total - ihl < 8 || be16(l4 + 2) != udp_port)
            return;
        put16(l4 + 2, be16(ip + ihl));
        put16(l4, udp_port);
        put16(l4 + 6, 0);       /* no UDP checksum (allowed over IPv4) */
    } else {
        return;
    }
    put16(rip + 10, 0);
    put16(rip + 10, checksum(rip, ihl));
    tx_send(tx_sent, 14 + total);
}

static void frame(const uint8_t *f, uint32_t len)
{
    if (len < 14)
        return;
    if (!same(f, mac, 6) && !(f[0] & 1))
        return;                 /* unicast to someone else */
    switch (be16(f + 12)) {
    case 0x0806: arp(f, len); break;
    case 0x0800: ipv4(f, len); break;
    }
}

static int parse_ip(const struct token *t, uint8_t out[4], uint32_t *prefix)
{
    const char *s = t->val, *end = t->val + t->vlen;
    uint32_t part = 0, n = 0, digits = 0;

    *prefix = 32;
    for (; s <= end; s++) {
        if (s < end && *s >= '0' && *s <= '9') {
            part = part * 10 + (uint32_t)(*s - '0');
            if (++digits > 3 || part > 255)
                return 0;
        } else if (s == end || *s == '.' || *s == '/') {
            if (!digits || n >= 4)
                return 0;
            out[n++] = (uint8_t)part;
            part = digits = 0;
            if (s < end && *s == '/') {
                uint32_t p = 0, pd = 0;
                for (s++; s < end; s++) {
                    if (*s < '0' || *s > '9' || ++pd > 2)
                        return 0;
                    p = p * 10 + (uint32_t)(*s - '0');
                }
                if (!pd || p > 32)
                    return 0;
                *prefix = p;
                break;
            }
        } else {
            return 0;
        }
    }
    return n == 4;
}

static void puthex2(uint8_t b)
{
    putc("0123456789abcdef"[b >> 4]);
    putc("0123456789abcdef"[b & 15]);
}

static int bad(const struct token *t, const char *what)
{
    puts("netecho: ");
    puts(what);
    puts(" ");
    putn(t->s, t->len);
    puts("\n");
    return 2;
}

int kmain(uint32_t magic, const struct mb_info *mbi)
{
    const char *p;
    struct token t;
    uint32_t prefix = 0, id, bar = 0;
    uint64_t port = 7;
    int dev, i, have_ip = 0;

    if (magic != MB_BOOT_MAGIC) {
        puts("bad magic\n");
        return 1;
    }
    p = cmdline_start(mbi);
    while (next_token(&p, &t)) {
        if (key_is(&t, "ip")) {
            if (!parse_ip(&t, myip, &prefix))
                return bad(&t, "bad address");
            have_ip = 1;
        } else if (key_is(&t, "port")) {
            if (!parse_dec(&t, &port) || !port || port > 65535)
                return bad(&t, "bad port");
        } else if (beacon_param(&t) < 0)
            return bad(&t, "bad value");
    }
    if (!have_ip) {
        puts("netecho: no ip=A.B.C.D/NN on the command line\n");
        return 2;
    }
    udp_port = (uint16_t)port;

    for (dev = 0; dev < 32; dev++) {
        id = pci_read(dev, 0);
        if (id == 0x10001AF4u && (pci_read(dev, 0x2C) >> 16) == 1)
            break;
    }
    if (dev == 32) {
        puts("netecho: no virtio-net card (1af4:1000) on PCI bus 0\n");
        return 2;
    }
    bar = pci_read(dev, 0x10);
    if (!(bar & 1)) {
        puts("netecho: BAR0 is not an I/O BAR\n");
        return 2;
    }
    io = (uint16_t)(bar & ~3u);
    /* I/O space and bus mastering (the card reads and writes our rings). */
    pci_write(dev, 0x04, (pci_read(dev, 0x04) & 0xFFFF) | 0x5);

    outb(io + VIRTIO_STATUS, 0);
    outb(io + VIRTIO_STATUS, ST_ACK);
    outb(io + VIRTIO_STATUS, ST_ACK | ST_DRIVER);
    if (!(inl(io + VIRTIO_HOST_FEATURES) & F_MAC)) {
        puts("netecho: the card offers no MAC\n");
        outb(io + VIRTIO_STATUS, ST_FAILED);
        return 2;
    }
    outl(io + VIRTIO_GUEST_FEATURES, F_MAC);
    for (i = 0; i < 6; i++)
        mac[i] = inb((uint16_t)(io + VIRTIO_NET_MAC + i));
    if (!setup_queue(0, &rxq) || !setup_queue(1, &txq)) {
        puts("netecho: unusable queue size\n");
        outb(io + VIRTIO_STATUS, ST_FAILED);
        return 2;
    }
    for (i = 0; i < NRX; i++) {
        rxq.desc[i].addr = (uint32_t)(uintptr_t)rxbuf[i];
        rxq.desc[i].len = BUFLEN;
        rxq.desc[i].flags = DESC_WRITE;
        rxq.desc[i].next = 0;
        rx_post((uint16_t)i);
    }
    outb(io + VIRTIO_STATUS, ST_ACK | ST_DRIVER | ST_DRIVER_OK);
    outw(io + VIRTIO_QUEUE_NOTIFY, 0);

    puts("netecho mac=");
    for (i = 0; i < 6; i++) {
        puthex2(mac[i]);
        if (i < 5)
            putc(':');
    }
    puts(" ip=");
    for (i = 0; i < 4; i++) {
        putdec(myip[i]);
        putc(i < 3 ? '.' : '/');
    }
    putdec(prefix);
    puts(" port=");
    putdec(udp_port);
    puts("\n");

    beacon_start();
    for (uint32_t idle = 0;; idle++) {
        beacon_poll(rdtsc());
        if (rxq.used[1] == rxq.last_used) {
            /* Reading the status is a port access (a VM exit): only now and then. */
            if (!(idle & 0xFFFFF) && broken()) {
                puts("netecho: the card needs a reset\n");
                return 2;
            }
            continue;
        }
        barrier();
        {
            volatile struct used_elem *e = &used_ring(&rxq)[rxq.last_used % rxq.size];
            uint32_t bid = e->id, len = e->len;

            rxq.last_used++;
            if (bid < NRX && len > HDRLEN && len <= BUFLEN)
                frame(rxbuf[bid] + HDRLEN, len - HDRLEN);
            if (bid < NRX)
                rx_post((uint16_t)bid);
            barrier();
            outw(io + VIRTIO_QUEUE_NOTIFY, 0);
        }
    }
}
