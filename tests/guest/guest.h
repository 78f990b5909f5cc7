/*
 * What the test guest's files share: fixed-size types, port and MMIO access,
 * the UART output of guest.c, and the virtio-mmio transport of virtio.c
 * (version 2 registers, VIRTIO 1.2 section 4.2.2; one split virtqueue,
 * section 2.7). Freestanding: no libc, no headers of the build machine.
 */
#ifndef KVMMEM_GUEST_H
#define KVMMEM_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define MIB (1UL << 20)
#define LAPIC 0xfee00000UL

/* -- hardware access (static inline: each file gets its own copy) -------- */

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 rd32(u64 a) { return *(volatile u32 *)a; }
static inline void wr32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline u64 rd64(u64 a) { return *(volatile u64 *)a; }
static inline void wr64(u64 a, u64 v) { *(volatile u64 *)a = v; }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return lo | (u64)hi << 32; }
#define barrier() __asm__ volatile("" ::: "memory")

/* -- guest.c: output, exit, command line ----------------------------------- */

__attribute__((noreturn)) void finish(int code);	/* isa-debug-exit: 0 ok, 1 failure */
__attribute__((noreturn)) void fail(const char *why);	/* print why, finish(1) */
void putc(char c);
void puts(const char *s);
void putdec(u64 v);
void puthex(u64 v);
int word_is(const char *v, const char *w);

/* -- virtio.c: the virtio-mmio transport and one split virtqueue ------------ */

#define VM_MAGIC 0x000
#define VM_VERSION 0x004
#define VM_DEVICE_ID 0x008
#define VM_DEV_FEATURES 0x010
#define VM_DEV_FEATURES_SEL 0x014
#define VM_DRV_FEATURES 0x020
#define VM_DRV_FEATURES_SEL 0x024
#define VM_QUEUE_SEL 0x030
#define VM_QUEUE_NUM_MAX 0x034
#define VM_QUEUE_NUM 0x038
#define VM_QUEUE_READY 0x044
#define VM_QUEUE_NOTIFY 0x050
#define VM_INT_STATUS 0x060
#define VM_INT_ACK 0x064
#define VM_STATUS 0x070
#define VM_QUEUE_DESC 0x080
#define VM_QUEUE_DRIVER 0x090
#define VM_QUEUE_DEVICE 0x0a0
#define VM_CONFIG_GEN 0x0fc
#define VM_CONFIG 0x100

#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40

#define F_VERSION_1 (1UL << 32)

#define D_NEXT 1	/* VIRTQ_DESC_F_NEXT */
#define D_WRITE 2	/* VIRTQ_DESC_F_WRITE: device-writable */

#define QMAX 8
struct desc { u64 addr; u32 len; u16 flags, next; };
struct avail { u16 flags, idx, ring[QMAX], used_event; };
struct used { u16 flags, idx; struct { u32 id, len; } ring[QMAX]; u16 avail_event; };

/* One device's queue 0: the rings (descriptor table first, 16-aligned) and
 * where the driver is in them. */
struct virtq {
	struct desc desc[QMAX];
	struct avail avail;
	struct used used;
	u64 base;		/* virtio-mmio window */
	u64 offered;		/* the device's feature bits */
	u16 size, last_used;
} __attribute__((aligned(16)));

/* Reset the device at base, accept offered & wanted (VERSION_1 is
 * required), set up queue 0 and set DRIVER_OK; returns the accepted bits. */
u64 virtio_init(struct virtq *q, u64 base, u64 wanted);
/* Make the chain starting at desc[head] available, notify, and wait for the
 * device to use it: 0 when used, -1 on DEVICE_NEEDS_RESET. */
int virtq_run(struct virtq *q, u16 head);
/* The two halves of virtq_run, for a driver that works while a request is in flight. */
void virtq_post(struct virtq *q, u16 head);
int virtq_wait(struct virtq *q);
static inline u32 cfg32(const struct virtq *q, u32 off) { return rd32(q->base + VM_CONFIG + off); }
/* 64-bit config fields are read as two 32-bit halves, as virtio-mmio asks */
static inline u64 cfg64(const struct virtq *q, u32 off) { return cfg32(q, off) | (u64)cfg32(q, off + 4) << 32; }

/* -- virtio_mem.c ------------------------------------------------------------ */

enum { PLUG, UNPLUG, UNPLUG_ALL, STATE };
enum { ACK, NACK, BUSY, ERROR };
struct mem_config { u64 block_size, addr, region_size, usable, plugged, requested; };
void mem_read_config(struct mem_config *c);
int mem_request(u16 type, u64 addr, u64 nb_blocks);	/* the response type */
u64 mem_init(u64 base);		/* the accepted features */
__attribute__((noreturn)) void mem_send_malformed(const char *how, u64 addr);
__attribute__((noreturn)) void mem_follow_requested_size(int read_unplugged, int reset_when_done,
							 long steps_left);
extern int mem_hammer;		/* kvmmem.hammer=1: see guest.c */
void irq_handler(void);

/* -- virtio_blk.c ------------------------------------------------------------ */

__attribute__((noreturn)) void blk_rounds(u64 base, u64 rounds);
__attribute__((noreturn)) void blk_inflight(u64 base, u64 rounds);

#endif
