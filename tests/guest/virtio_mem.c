/*
 * The test guest's virtio-mem driver (VIRTIO 1.2 section 5.15): follows
 * requested_size the way Linux's driver does, in 128 MiB steps, writes a
 * pattern into every block it plugs and checks it after each step; or sends
 * one malformed request (kvmmem.malformed=).
 */
#include "guest.h"

#define STEP_SIZE (128 * MIB)	/* a Linux memory block */
#define PATTERN(a) ((a) ^ 0x6b766d6d656d0000UL)
#define F_UNPLUGGED_INACCESSIBLE (1UL << 1)

struct mem_req { u16 type, pad[3]; u64 addr; u16 nb_blocks, pad2[3]; };
struct mem_resp { u16 type, pad[3]; u16 state; };
_Static_assert(sizeof(struct mem_req) == 24, "virtio_mem_req is 24 bytes");
_Static_assert(sizeof(struct mem_resp) == 10, "virtio_mem_resp is 10 bytes");

static struct virtq q;
static struct mem_req req;
static struct mem_resp resp;
static volatile u32 irq_seen;	/* InterruptStatus bits seen by the handler */

void mem_read_config(struct mem_config *c)
{
	u32 gen;
	do {
		gen = rd32(q.base + VM_CONFIG_GEN);
		c->block_size = cfg64(&q, 0);
		c->addr = cfg64(&q, 16);
		c->region_size = cfg64(&q, 24);
		c->usable = cfg64(&q, 32);
		c->plugged = cfg64(&q, 40);
		c->requested = cfg64(&q, 48);
	} while (rd32(q.base + VM_CONFIG_GEN) != gen);
}

u64 mem_init(u64 base)
{
	return virtio_init(&q, base, F_UNPLUGGED_INACCESSIBLE);
}

/* One chain: request (req_addr, req_len) then the response; with loop, two
 * readable descriptors pointing at each other (0 -> 1 -> 0 -> ...). */
static int submit(u64 req_addr, u32 req_len, int loop)
{
	q.desc[0] = (struct desc){ req_addr, req_len, D_NEXT, 1 };
	q.desc[1] = (struct desc){ (u64)&resp, sizeof(resp), D_WRITE, 0 };
	if (loop)
		q.desc[1] = (struct desc){ req_addr, req_len, D_NEXT, 0 };
	resp.type = 0xffff;
	return virtq_run(&q, 0);
}

int mem_request(u16 type, u64 addr, u64 nb_blocks)
{
	req = (struct mem_req){ .type = type, .addr = addr, .nb_blocks = nb_blocks };
	if (submit((u64)&req, sizeof(req), 0))
		fail("error: device needs reset");
	return resp.type;
}

/* One malformed STATE request, then report the device status and exit. */
void mem_send_malformed(const char *how, u64 addr)
{
	u64 req_addr = (u64)&req;
	u32 len = sizeof(req);
	int loop = 0;
	req = (struct mem_req){ .type = STATE, .addr = addr, .nb_blocks = 1 };
	if (word_is(how, "short"))
		len = 16;
	else if (word_is(how, "type"))
		req.type = 7;
	else if (word_is(how, "desc"))
		req_addr = 1UL << 46;	/* 64 TiB: no RAM there */
	else if (word_is(how, "loop"))
		loop = 1;
	else
		fail("kvmmem.malformed= must be short, type, desc or loop");
	puts("malformed ");
	while (*how && *how != ' ')
		putc(*how++);
	if (submit(req_addr, len, loop) == 0) {
		puts(": response type "); putdec(resp.type);
	} else {
		puts(": no response");
	}
	puts(" status="); puthex(rd32(q.base + VM_STATUS)); putc('\n');
	finish(0);
}

/* The virtio-mem device's interrupt (vector IRQ_VECTOR, see guest.c). */
void irq_handler(void)
{
	u32 status = rd32(q.base + VM_INT_STATUS);
	wr32(q.base + VM_INT_ACK, status);
	irq_seen |= status;
	wr32(LAPIC + 0xb0, 0);	/* EOI */
}

static void wait_config_change(void)
{
	puts("waiting for a config change\n");
	while (!(irq_seen & 2))
		__asm__ volatile("sti; hlt; cli" ::: "memory");
	irq_seen &= ~2U;
}

/* -- following requested_size ------------------------------------------------- */

static u64 plugged;	/* [addr, addr + plugged) is plugged, in the guest's view */

static void check_patterns(const struct mem_config *c)
{
	for (u64 a = c->addr; a < c->addr + plugged; a += c->block_size) {
		u64 v = rd64(a);
		if (v != PATTERN(a)) {
			puts("pattern mismatch at "); puthex(a); puts(": "); puthex(v); putc('\n');
			finish(1);
		}
	}
}

static void read_word(u64 a)
{
	puts("read "); puthex(a); puts(" = "); puthex(rd64(a)); putc('\n');
}

static void step_done(int read_unplugged, long *steps_left)
{
	struct mem_config c;
	mem_read_config(&c);
	if (c.plugged != plugged) {
		puts("plugged_size mismatch: device "); putdec(c.plugged);
		puts(" guest "); putdec(plugged); putc('\n');
		finish(1);
	}
	check_patterns(&c);
	puts("plugged="); putdec(plugged); puts(" requested="); putdec(c.requested); puts(" ok\n");
	if (read_unplugged) {
		if (c.region_size - c.block_size >= plugged)
			read_word(c.addr + c.region_size - c.block_size);
		if (plugged < c.region_size)
			read_word(c.addr + plugged);
	}
	if (*steps_left > 0 && --*steps_left == 0) {
		puts("done\n");
		finish(0);
	}
}

int mem_hammer;		/* kvmmem.hammer=1 */

/* Keep writing and checking plugged memory while the host replaces the
 * memslots under it: a word it loses or reads back wrong ends the VM with 1. */
static __attribute__((noreturn)) void hammer_plugged(const struct mem_config *c)
{
	u64 half = c->block_size / 2;
	for (u64 round = 1;; round++) {
		for (u64 a = c->addr; a < c->addr + plugged; a += c->block_size) {
			wr64(a, PATTERN(a) ^ round);
			wr64(a + half, PATTERN(a + half) ^ round);
		}
		for (u64 a = c->addr; a < c->addr + plugged; a += half) {
			u64 v = rd64(a);
			if (v != (PATTERN(a) ^ round)) {
				puts("hammer mismatch at "); puthex(a); puts(": "); puthex(v);
				puts(" round="); putdec(round); putc('\n');
				finish(1);
			}
		}
		if (round % 64 == 0) {
			puts("hammer round="); putdec(round); putc('\n');
		}
	}
}

void mem_follow_requested_size(int read_unplugged, int reset_when_done, long steps_left)
{
	struct mem_config c;
	mem_read_config(&c);
	u64 bs = c.block_size;
	if (!bs || (bs & (bs - 1)) || STEP_SIZE / bs > 0xffff)
		fail("error: bad block_size");
	u64 step = bs > STEP_SIZE ? bs : STEP_SIZE;
	int unplug_all = c.plugged != 0, nacks = 0, busy = 0, steps = 0;
	for (;;) {
		mem_read_config(&c);
		u64 start = 0, end = 0;
		int type;
		if (unplug_all) {
			type = UNPLUG_ALL;
		} else if (plugged == c.requested) {
			if (mem_hammer)
				hammer_plugged(&c);
			if (reset_when_done) {
				puts("resetting\n");
				outb(0x64, 0xfe);	/* the keyboard controller's reset line */
			}
			wait_config_change();
			continue;
		} else if (plugged < c.requested) {
			type = PLUG, start = plugged, end = (plugged & ~(step - 1)) + step;
			if (end > c.requested)
				end = c.requested;
		} else {
			type = UNPLUG, end = plugged, start = (plugged - 1) & ~(step - 1);
			if (start < c.requested)
				start = c.requested;
		}
		if ((start | end) & (bs - 1) || end > c.usable)
			fail("error: requested_size is not in blocks or beyond the usable region");
		int r = mem_request(type, type == UNPLUG_ALL ? 0 : c.addr + start, (end - start) / bs);
		if (r == NACK) {
			if (++nacks > 100)
				fail("error: too many NACKs");
			continue;
		}
		if (r == BUSY) {
			puts("busy\n");
			if (++busy > 3)
				fail("error: device stays busy");
			continue;
		}
		if (r != ACK) {
			puts("error: request type "); putdec(type); puts(" addr "); puthex(c.addr + start);
			puts(" blocks "); putdec((end - start) / bs); puts(" answered "); putdec(r);
			fail("");
		}
		nacks = busy = unplug_all = 0;
		if (type == PLUG)
			for (u64 a = c.addr + start; a < c.addr + end; a += bs)
				wr64(a, PATTERN(a));
		plugged = type == PLUG ? end : start;
		step_done(read_unplugged && steps++ == 0, &steps_left);
	}
}
