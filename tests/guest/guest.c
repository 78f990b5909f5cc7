/*
 * kvmmem test guest: a tiny virtio-mem driver over virtio-mmio.
 *
 * Booted by kvmmem/vmm/boot.py (Linux x86-64 64-bit boot protocol: long
 * mode, identity map covering RAM, the MMIO window and device memory,
 * RSI = zero page). It reads the command line from the zero page, finds
 * the virtio-mem device, and follows requested_size the way Linux's
 * driver does, printing one line per step on the 16550 UART at 0x3f8.
 *
 * Command line:
 *   virtio_mmio.device=<size>@<base>:<irq>  Linux's syntax (size 0x200, 512,
 *                           4K...; base hex); the first virtio-mem one is used
 *   kvmmem.steps=N          exit 0 after N step lines (0: right after boot)
 *   kvmmem.read_unplugged=1 after the first step, read one word of an
 *                           unplugged block far away (the region's last
 *                           block) and of the block after the plugged ones
 *   kvmmem.reset=1          reset the machine (0xfe to port 0x64) each time
 *                           requested_size is reached
 *   kvmmem.hammer=1         once requested_size is first reached, write and
 *                           read back one word of every plugged block (and
 *                           one in its middle) forever, a new value each
 *                           round, printing a line every 64 rounds; the host
 *                           changes memslots meanwhile and ends the VM
 *   kvmmem.malformed=short|type|desc|loop
 *                           send one malformed request (16-byte request,
 *                           type 7, descriptor outside RAM, looping chain),
 *                           print the device status, exit 0
 *
 * Output lines:
 *   kvmmem-guest: cmdline "<command line>"
 *   e820: <n> entries, ram=<bytes>
 *   virtio-mmio at 0x<base> irq <n>: ...       (probe result)
 *   virtio-mem: features=0x<f> block_size=<bytes> addr=0x<addr> ...
 *   plugged=<bytes> requested=<bytes> ok       (one per step)
 *   read 0x<addr> = 0x<value>                  (read_unplugged)
 *   malformed <how>: <answer> status=0x<status>
 *   hammer round=<n>                           (hammer, every 64 rounds)
 *   hammer mismatch at 0x<addr>: 0x<value> round=<n>
 *   waiting for a config change
 *   pattern mismatch at 0x<addr>: 0x<value> / busy / error ... / no virtio-mmio device
 * Exit: byte to port 0xf4 (isa-debug-exit): 0 success, 1 failure.
 *
 * Keep it small: guest instructions are emulated on the target machines.
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define MIB (1UL << 20)
#define STEP_SIZE (128 * MIB)	/* a Linux memory block */
#define PATTERN(a) ((a) ^ 0x6b766d6d656d0000UL)

/* virtio-mmio version 2 registers */
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

#define F_UNPLUGGED_INACCESSIBLE (1UL << 1)
#define F_VERSION_1 (1UL << 32)

enum { PLUG, UNPLUG, UNPLUG_ALL, STATE };
enum { ACK, NACK, BUSY, ERROR };

#define LAPIC 0xfee00000UL
#define IOAPIC 0xfec00000UL
#define IRQ_VECTOR 0x30

/* -- hardware access ------------------------------------------------------ */

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 rd32(u64 a) { return *(volatile u32 *)a; }
static inline void wr32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline u64 rd64(u64 a) { return *(volatile u64 *)a; }
static inline void wr64(u64 a, u64 v) { *(volatile u64 *)a = v; }
#define barrier() __asm__ volatile("" ::: "memory")

static __attribute__((noreturn)) void finish(int code)
{
	outb(0xf4, code);
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* -- serial output -------------------------------------------------------- */

static void putc(char c)
{
	while (!(inb(0x3fd) & 0x20))
		;
	outb(0x3f8, c);
}

static void puts(const char *s) { while (*s) putc(*s++); }

static void putdec(u64 v)
{
	char buf[21], *p = buf + 20;
	*p = 0;
	do *--p = '0' + v % 10; while (v /= 10);
	puts(p);
}

static void puthex(u64 v)
{
	char buf[19], *p = buf + 18;
	*p = 0;
	do *--p = "0123456789abcdef"[v & 15]; while (v >>= 4);
	*--p = 'x';
	*--p = '0';
	puts(p);
}

static __attribute__((noreturn)) void fail(const char *why)
{
	puts(why);
	putc('\n');
	finish(1);
}

/* -- command line ----------------------------------------------------------- */

/* The value of the first "key" (ending in '=') at or after s, or 0. */
static const char *find_arg(const char *s, const char *key)
{
	for (; *s; s++) {
		if (s[0] == ' ')
			continue;
		const char *p = s, *k = key;
		while (*k && *p == *k)
			p++, k++;
		if (!*k)
			return p;
		while (s[1] && s[1] != ' ')
			s++;
	}
	return 0;
}

static int word_is(const char *v, const char *w)
{
	while (*w && *v == *w)
		v++, w++;
	return !*w && (*v == ' ' || !*v);
}

/* A number, hex with 0x or decimal, with an optional K/M/G suffix if memparse. */
static u64 parse_num(const char **sp, int memparse, int *ok)
{
	const char *s = *sp;
	u64 v = 0, base = 10;
	int digits = 0;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X'))
		s += 2, base = 16;
	for (;; s++, digits++) {
		u64 d;
		if (*s >= '0' && *s <= '9') d = *s - '0';
		else if (base == 16 && (*s | 32) >= 'a' && (*s | 32) <= 'f') d = (*s | 32) - 'a' + 10;
		else break;
		v = v * base + d;
	}
	if (memparse) {
		switch (*s | 32) {
		case 'g': v <<= 10; /* fall through */
		case 'm': v <<= 10; /* fall through */
		case 'k': v <<= 10; s++;
		}
	}
	*ok = *ok && digits > 0;
	*sp = s;
	return v;
}

/* -- the virtio-mmio device ------------------------------------------------ */

#define QMAX 8
struct desc { u64 addr; u32 len; u16 flags, next; };
struct avail { u16 flags, idx, ring[QMAX], used_event; };
struct used { u16 flags, idx; struct { u32 id, len; } ring[QMAX]; u16 avail_event; };
struct mem_req { u16 type, pad[3]; u64 addr; u16 nb_blocks, pad2[3]; };
struct mem_resp { u16 type, pad[3]; u16 state; };
_Static_assert(sizeof(struct mem_req) == 24, "virtio_mem_req is 24 bytes");
_Static_assert(sizeof(struct mem_resp) == 10, "virtio_mem_resp is 10 bytes");

static struct desc ring_desc[QMAX] __attribute__((aligned(16)));
static struct avail ring_avail __attribute__((aligned(2)));
static struct used ring_used __attribute__((aligned(4)));
static struct mem_req req;
static struct mem_resp resp;
static u16 qsize, last_used;

static u64 dev;			/* virtio-mmio base */
static u32 dev_irq;
static volatile u32 irq_seen;	/* InterruptStatus bits seen by the handler */

struct mem_config { u64 block_size, addr, region_size, usable, plugged, requested; };

/* 64-bit config fields are read as two 32-bit halves, as virtio-mmio asks */
static u64 cfg64(u32 off)
{
	return rd32(dev + VM_CONFIG + off) | (u64)rd32(dev + VM_CONFIG + off + 4) << 32;
}

static void read_config(struct mem_config *c)
{
	u32 gen;
	do {
		gen = rd32(dev + VM_CONFIG_GEN);
		c->block_size = cfg64(0);
		c->addr = cfg64(16);
		c->region_size = cfg64(24);
		c->usable = cfg64(32);
		c->plugged = cfg64(40);
		c->requested = cfg64(48);
	} while (rd32(dev + VM_CONFIG_GEN) != gen);
}

static void set_status(u32 bits) { wr32(dev + VM_STATUS, rd32(dev + VM_STATUS) | bits); }

/* Probe every virtio_mmio.device=; keep the first virtio-mem one. */
static int find_device(const char *cmdline)
{
	const char *v = cmdline;
	int found = 0;
	while ((v = find_arg(v, "virtio_mmio.device="))) {
		int ok = 1;
		u64 size = parse_num(&v, 1, &ok), base = 0, irq = 0;
		ok = ok && *v++ == '@';
		if (ok) base = parse_num(&v, 0, &ok);
		ok = ok && *v++ == ':';
		if (ok) irq = parse_num(&v, 0, &ok);
		if (!ok || size < 0x100 || irq > 23) {
			puts("bad virtio_mmio.device= argument\n");
			continue;
		}
		found = 1;
		puts("virtio-mmio at "); puthex(base); puts(" irq "); putdec(irq);
		u32 magic = rd32(base + VM_MAGIC), version = rd32(base + VM_VERSION);
		u32 id = rd32(base + VM_DEVICE_ID);
		if (magic != 0x74726976 || version != 2) {
			puts(": bad magic "); puthex(magic); puts(" or version "); putdec(version); putc('\n');
			continue;
		}
		puts(": device id "); putdec(id); putc('\n');
		if (id == 24 && !dev)
			dev = base, dev_irq = irq;
	}
	if (!found)
		fail("no virtio-mmio device");
	return dev != 0;
}

static u64 init_device(void)
{
	wr32(dev + VM_STATUS, 0);
	set_status(S_ACKNOWLEDGE);
	set_status(S_DRIVER);
	wr32(dev + VM_DEV_FEATURES_SEL, 0);
	u64 offered = rd32(dev + VM_DEV_FEATURES);
	wr32(dev + VM_DEV_FEATURES_SEL, 1);
	offered |= (u64)rd32(dev + VM_DEV_FEATURES) << 32;
	if (!(offered & F_VERSION_1))
		fail("device does not offer VIRTIO_F_VERSION_1");
	u64 wanted = offered & (F_VERSION_1 | F_UNPLUGGED_INACCESSIBLE);
	wr32(dev + VM_DRV_FEATURES_SEL, 0);
	wr32(dev + VM_DRV_FEATURES, (u32)wanted);
	wr32(dev + VM_DRV_FEATURES_SEL, 1);
	wr32(dev + VM_DRV_FEATURES, wanted >> 32);
	set_status(S_FEATURES_OK);
	if (!(rd32(dev + VM_STATUS) & S_FEATURES_OK))
		fail("device refused FEATURES_OK");

	wr32(dev + VM_QUEUE_SEL, 0);
	u32 max = rd32(dev + VM_QUEUE_NUM_MAX);
	if (!max || rd32(dev + VM_QUEUE_READY))
		fail("queue 0 is not available");
	for (qsize = QMAX; qsize > max; qsize >>= 1)
		;
	wr32(dev + VM_QUEUE_NUM, qsize);
	ring_avail.flags = 1;	/* VIRTQ_AVAIL_F_NO_INTERRUPT: completions are polled */
	u64 areas[3] = { (u64)ring_desc, (u64)&ring_avail, (u64)&ring_used };
	for (int i = 0; i < 3; i++) {
		wr32(dev + VM_QUEUE_DESC + 0x10 * i, (u32)areas[i]);
		wr32(dev + VM_QUEUE_DESC + 0x10 * i + 4, areas[i] >> 32);
	}
	wr32(dev + VM_QUEUE_READY, 1);
	set_status(S_DRIVER_OK);
	return wanted;
}

/*
 * Post one chain (request at req_addr, response) and wait for the device by
 * polling the used ring; each try also reads Status (an exit to the VMM), so
 * the loop stays short. Returns 0 when answered, -1 on DEVICE_NEEDS_RESET.
 */
static int submit(u64 req_addr, u32 req_len, int loop)
{
	ring_desc[0] = (struct desc){ req_addr, req_len, 1 /* NEXT */, 1 };
	ring_desc[1] = (struct desc){ (u64)&resp, sizeof(resp), 2 /* WRITE */, 0 };
	if (loop)	/* two readable descriptors: 0 -> 1 -> 0 -> ... */
		ring_desc[1] = (struct desc){ req_addr, req_len, 1 /* NEXT */, 0 };
	resp.type = 0xffff;
	ring_avail.ring[ring_avail.idx % qsize] = 0;
	barrier();
	ring_avail.idx++;
	barrier();
	wr32(dev + VM_QUEUE_NOTIFY, 0);
	for (int tries = 0; tries < 20000; tries++) {
		if (*(volatile u16 *)&ring_used.idx != last_used) {
			last_used++;
			return 0;
		}
		if (rd32(dev + VM_STATUS) & S_NEEDS_RESET)
			return -1;
		__asm__ volatile("pause");
	}
	fail("timeout waiting for the device");
}

static int request(u16 type, u64 addr, u64 nb_blocks)
{
	req = (struct mem_req){ .type = type, .addr = addr, .nb_blocks = nb_blocks };
	if (submit((u64)&req, sizeof(req), 0))
		fail("error: device needs reset");
	return resp.type;
}

/* One malformed STATE request, then report the device status and exit. */
static __attribute__((noreturn)) void send_malformed(const char *how, u64 addr)
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
	puts(" status="); puthex(rd32(dev + VM_STATUS)); putc('\n');
	finish(0);
}

/* -- interrupts --------------------------------------------------------------- */

struct idt_entry { u16 off0, sel; u8 ist, type; u16 off1; u32 off2, zero; };
static struct idt_entry idt[256] __attribute__((aligned(16)));
extern char exc_stubs[], unexpected_stub[], irq_stub[], spurious_stub[];

static void set_gate(int v, void *fn)
{
	u64 a = (u64)fn;
	idt[v] = (struct idt_entry){ a & 0xffff, 0x10, 0, 0x8e, (a >> 16) & 0xffff, a >> 32, 0 };
}

void trap_fatal(u32 vector, u64 *frame)
{
	/* exceptions 8, 10-14, 17, 21, 29, 30 push an error code before RIP */
	int err = vector < 32 && ((0x60227d00U >> vector) & 1);
	u64 cr2;
	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	puts("exception "); puthex(vector);
	puts(" rip="); puthex(frame[err]);
	puts(" error="); puthex(err ? frame[0] : 0);
	puts(" cr2="); puthex(cr2); putc('\n');
	finish(1);
}

void irq_handler(void)
{
	u32 status = rd32(dev + VM_INT_STATUS);
	wr32(dev + VM_INT_ACK, status);
	irq_seen |= status;
	wr32(LAPIC + 0xb0, 0);	/* EOI */
}

static void ioapic_write(u32 reg, u32 v) { wr32(IOAPIC, reg); wr32(IOAPIC + 0x10, v); }

static void init_interrupts(void)
{
	outb(0x21, 0xff);	/* mask both 8259s: KVM's LINT0 is ExtINT */
	outb(0xa1, 0xff);
	for (int v = 0; v < 256; v++)
		set_gate(v, v < 32 ? exc_stubs + 16 * v : unexpected_stub);
	set_gate(IRQ_VECTOR, irq_stub);
	set_gate(0xff, spurious_stub);
	struct { u16 limit; u64 base; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (u64)idt };
	__asm__ volatile("lidt %0" :: "m"(idtr));
	wr32(LAPIC + 0xf0, rd32(LAPIC + 0xf0) | 0x1ff);	/* enable, spurious vector 0xff */
	ioapic_write(0x10 + 2 * dev_irq + 1, 0);		/* destination: APIC 0 */
	ioapic_write(0x10 + 2 * dev_irq, IRQ_VECTOR);	/* fixed, physical, edge, high, unmasked */
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
static long steps_left = -1;

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

static void step_done(int read_unplugged)
{
	struct mem_config c;
	read_config(&c);
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
	if (steps_left > 0 && --steps_left == 0) {
		puts("done\n");
		finish(0);
	}
}

static int reset_when_done;	/* kvmmem.reset=1 */
static int hammer;		/* kvmmem.hammer=1 */

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

static __attribute__((noreturn)) void follow_requested_size(struct mem_config c, int read_unplugged)
{
	u64 bs = c.block_size;
	if (!bs || (bs & (bs - 1)) || STEP_SIZE / bs > 0xffff)
		fail("error: bad block_size");
	u64 step = bs > STEP_SIZE ? bs : STEP_SIZE;
	int unplug_all = c.plugged != 0, nacks = 0, busy = 0, steps = 0;
	for (;;) {
		read_config(&c);
		u64 start = 0, end = 0;
		int type;
		if (unplug_all) {
			type = UNPLUG_ALL;
		} else if (plugged == c.requested) {
			if (hammer)
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
		int r = request(type, type == UNPLUG_ALL ? 0 : c.addr + start, (end - start) / bs);
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
		step_done(read_unplugged && steps++ == 0);
	}
}

/* -- entry --------------------------------------------------------------------- */

static u64 arg_num(const char *cmdline, const char *key, u64 dflt)
{
	const char *v = find_arg(cmdline, key);
	int ok = 1;
	if (!v)
		return dflt;
	u64 n = parse_num(&v, 0, &ok);
	if (!ok)
		fail("bad number in a kvmmem. argument");
	return n;
}

void __attribute__((noreturn)) guest_main(const u8 *zero_page)
{
	const char *cmdline = (const char *)(*(const u32 *)(zero_page + 0x228) |
					     (u64)*(const u32 *)(zero_page + 0xc8) << 32);
	puts("kvmmem-guest: cmdline \""); puts(cmdline); puts("\"\n");
	u8 entries = zero_page[0x1e8];
	u64 ram = 0;
	for (int i = 0; i < entries; i++) {
		const u8 *e = zero_page + 0x2d0 + 20 * i;
		if (*(const u32 *)(e + 16) == 1)
			ram += *(const u64 *)(e + 8);
	}
	puts("e820: "); putdec(entries); puts(" entries, ram="); putdec(ram); putc('\n');

	steps_left = arg_num(cmdline, "kvmmem.steps=", (u64)-1);
	if (steps_left == 0) {
		puts("done\n");
		finish(0);
	}
	if (!find_device(cmdline))
		fail("no virtio-mem device");
	u64 features = init_device();
	init_interrupts();
	struct mem_config c;
	read_config(&c);
	puts("virtio-mem: features="); puthex(features);
	puts(" block_size="); putdec(c.block_size); puts(" addr="); puthex(c.addr);
	puts(" region_size="); putdec(c.region_size); puts(" usable="); putdec(c.usable);
	puts(" plugged="); putdec(c.plugged); puts(" requested="); putdec(c.requested); putc('\n');
	const char *how = find_arg(cmdline, "kvmmem.malformed=");
	if (how)
		send_malformed(how, c.addr);
	reset_when_done = arg_num(cmdline, "kvmmem.reset=", 0) != 0;
	hammer = arg_num(cmdline, "kvmmem.hammer=", 0) != 0;
	follow_requested_size(c, arg_num(cmdline, "kvmmem.read_unplugged=", 0) != 0);
}
