/*
 * kvmmem test guest: tiny virtio-mem and virtio-blk drivers over virtio-mmio.
 *
 * Booted by kvmmem/vmm/boot.py (Linux x86-64 64-bit boot protocol: long
 * mode, identity map covering RAM and the MMIO window, RSI = zero page;
 * device memory is mapped on its first page fault, page_fault below). It reads the command line from the zero page, finds
 * the virtio-mem device, and follows requested_size the way Linux's
 * driver does (virtio_mem.c), printing one line per step on the 16550 UART
 * at 0x3f8; or, with kvmmem.blk=, does block I/O through plugged memory
 * (virtio_blk.c). The transport and virtqueue are in virtio.c.
 *
 * Command line:
 *   virtio_mmio.device=<size>@<base>:<irq>  Linux's syntax (size 0x200, 512,
 *                           4K...; base hex); the first virtio-mem (id 24)
 *                           and the first virtio-blk (id 2) one are used
 *   kvmmem.steps=N          exit 0 after N step lines (0: right after boot)
 *   kvmmem.read_unplugged=1 after the first step, read one word of an
 *                           unplugged block far away (the region's last
 *                           block) and of the block after the plugged ones
 *   kvmmem.reset=1          reset the machine (0xfe to port 0x64) each time
 *                           requested_size is reached
 *   kvmmem.malformed=short|type|desc|loop
 *                           send one malformed request (16-byte request,
 *                           type 7, descriptor outside RAM, looping chain),
 *                           print the device status, exit 0
 *   kvmmem.hammer=1         once requested_size is first reached, write and
 *                           read back one word of every plugged block (and
 *                           one in its middle) forever, a new value each
 *                           round, printing a line every 64 rounds; the host
 *                           changes memslots meanwhile and ends the VM
 *   kvmmem.blk=N            N rounds of: plug two blocks, write a sector from
 *                           the first through the virtio-blk device (id 2),
 *                           read it back into the second, check, unplug both;
 *                           then exit 0 (see virtio_blk.c)
 *   kvmmem.blk_inflight=N   N rounds of: plug eight blocks, write 512 KiB from
 *                           the fourth and, while the write is in flight,
 *                           unplug the seventh; plug it again and read the
 *                           data back into the second while unplugging the
 *                           seventh again; check; then exit 0 (virtio_blk.c)
 *
 * Output lines:
 *   kvmmem-guest: cmdline "<command line>"
 *   e820: <n> entries, ram=<bytes>
 *   virtio-mmio at 0x<base> irq <n>: ...       (probe result)
 *   virtio-mem: features=0x<f> block_size=<bytes> addr=0x<addr> ...
 *   plugged=<bytes> requested=<bytes> ok       (one per step)
 *   read 0x<addr> = 0x<value>                  (read_unplugged)
 *   malformed <how>: <answer> status=0x<status>
 *   virtio-blk: ... / blk round <r>: ... ok / blk: <N> rounds done  (kvmmem.blk)
 *   blk inflight round <r>: sector <S> ok / blk inflight: <N> rounds done  (kvmmem.blk_inflight)
 *   hammer round=<n> / hammer mismatch at 0x<addr>: 0x<value> round=<n>  (kvmmem.hammer)
 *   waiting for a config change
 *   pattern mismatch at 0x<addr>: 0x<value> / busy / error ... / no virtio-mmio device
 * Exit: byte to port 0xf4 (isa-debug-exit): 0 success, 1 failure.
 *
 * Keep it small: guest instructions are emulated on the target machines.
 */

#include "guest.h"

#define IOAPIC 0xfec00000UL
#define IRQ_VECTOR 0x30

__attribute__((noreturn)) void finish(int code)
{
	outb(0xf4, code);
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* -- serial output -------------------------------------------------------- */

void putc(char c)
{
	while (!(inb(0x3fd) & 0x20))
		;
	outb(0x3f8, c);
}

void puts(const char *s) { while (*s) putc(*s++); }

void putdec(u64 v)
{
	char buf[21], *p = buf + 20;
	*p = 0;
	do *--p = '0' + v % 10; while (v /= 10);
	puts(p);
}

void puthex(u64 v)
{
	char buf[19], *p = buf + 18;
	*p = 0;
	do *--p = "0123456789abcdef"[v & 15]; while (v >>= 4);
	*--p = 'x';
	*--p = '0';
	puts(p);
}

__attribute__((noreturn)) void fail(const char *why)
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

int word_is(const char *v, const char *w)
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

/* -- finding the devices ------------------------------------------------------ */

static u64 mem_base, blk_base;	/* the first virtio-mem and virtio-blk windows */
static u32 mem_irq;

/* Probe every virtio_mmio.device=; keep the first virtio-mem (id 24) and
 * the first virtio-blk (id 2) one. */
static void find_devices(const char *cmdline)
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
		if (id == 24 && !mem_base)
			mem_base = base, mem_irq = irq;
		if (id == 2 && !blk_base)
			blk_base = base;
	}
	if (!found)
		fail("no virtio-mmio device");
}

/* -- interrupts --------------------------------------------------------------- */

struct idt_entry { u16 off0, sel; u8 ist, type; u16 off1; u32 off2, zero; };
static struct idt_entry idt[256] __attribute__((aligned(16)));
extern char exc_stubs[], unexpected_stub[], irq_stub[], spurious_stub[], pf_stub[];

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

/* -- device memory: mapped on first touch -------------------------------------
 * The loader's identity map covers boot RAM and the 4 GiB below the MMIO
 * window's end only (kvmmem/vmm/boot.py), as a Linux kernel needs: device
 * memory is the kernel's to map. A not-present fault maps the faulting
 * address's GiB 1:1 with 2 MiB pages, from a pool of page-table pages;
 * anything else is fatal. One CPU and the fault handler alone writes the
 * tables, so an entry may be linked before its table is filled. */

#define PT_PAGES 64
#define PTE_P 1UL
#define PTE_W 2UL
#define PTE_PS 0x80UL
#define PTE_ADDR 0x000ffffffffff000UL
static u64 pt_pool[PT_PAGES][512] __attribute__((aligned(4096)));
static u32 pt_used;

/* The table *entry points to, a new (zeroed) one if it is not present. */
static u64 *next_table(u64 *entry)
{
	if (!(*entry & PTE_P)) {
		if (pt_used == PT_PAGES)
			fail("error: page-table pool exhausted");
		*entry = (u64)pt_pool[pt_used++] | PTE_P | PTE_W;
	}
	return (u64 *)(*entry & PTE_ADDR);
}

void page_fault(u64 addr, u64 *frame)
{
	u64 cr3;
	__asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
	if ((frame[0] & 1) || addr >> 47)	/* a protection fault, or not low canonical */
		trap_fatal(14, frame);
	u64 *pml4 = (u64 *)(cr3 & PTE_ADDR);
	u64 *pde = next_table(&pml4[(addr >> 39) & 511]) + ((addr >> 30) & 511);
	if (*pde & PTE_P)			/* mapped already: a real fault */
		trap_fatal(14, frame);
	u64 *pd = next_table(pde);
	u64 gib = addr & ~((1UL << 30) - 1);
	for (u64 i = 0; i < 512; i++)
		pd[i] = (gib + i * (2 * MIB)) | PTE_P | PTE_W | PTE_PS;
}

static void ioapic_write(u32 reg, u32 v) { wr32(IOAPIC, reg); wr32(IOAPIC + 0x10, v); }

/* Route the virtio-mem device's pin to irq_stub (start.S -> irq_handler). */
static void init_interrupts(u32 irq)
{
	outb(0x21, 0xff);	/* mask both 8259s: KVM's LINT0 is ExtINT */
	outb(0xa1, 0xff);
	for (int v = 0; v < 256; v++)
		set_gate(v, v < 32 ? exc_stubs + 16 * v : unexpected_stub);
	set_gate(14, pf_stub);
	set_gate(IRQ_VECTOR, irq_stub);
	set_gate(0xff, spurious_stub);
	struct { u16 limit; u64 base; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (u64)idt };
	__asm__ volatile("lidt %0" :: "m"(idtr));
	wr32(LAPIC + 0xf0, rd32(LAPIC + 0xf0) | 0x1ff);	/* enable, spurious vector 0xff */
	ioapic_write(0x10 + 2 * irq + 1, 0);		/* destination: APIC 0 */
	ioapic_write(0x10 + 2 * irq, IRQ_VECTOR);	/* fixed, physical, edge, high, unmasked */
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

	long steps_left = arg_num(cmdline, "kvmmem.steps=", (u64)-1);
	if (steps_left == 0) {
		puts("done\n");
		finish(0);
	}
	find_devices(cmdline);
	if (!mem_base)
		fail("no virtio-mem device");
	u64 features = mem_init(mem_base);
	init_interrupts(mem_irq);
	struct mem_config c;
	mem_read_config(&c);
	puts("virtio-mem: features="); puthex(features);
	puts(" block_size="); putdec(c.block_size); puts(" addr="); puthex(c.addr);
	puts(" region_size="); putdec(c.region_size); puts(" usable="); putdec(c.usable);
	puts(" plugged="); putdec(c.plugged); puts(" requested="); putdec(c.requested); putc('\n');
	const char *how = find_arg(cmdline, "kvmmem.malformed=");
	if (how)
		mem_send_malformed(how, c.addr);
	u64 rounds = arg_num(cmdline, "kvmmem.blk=", 0);
	u64 inflight = arg_num(cmdline, "kvmmem.blk_inflight=", 0);
	if ((rounds || inflight) && !blk_base)
		fail("no virtio-blk device");
	if (rounds)
		blk_rounds(blk_base, rounds);
	if (inflight)
		blk_inflight(blk_base, inflight);
	mem_hammer = arg_num(cmdline, "kvmmem.hammer=", 0) != 0;
	mem_follow_requested_size(arg_num(cmdline, "kvmmem.read_unplugged=", 0) != 0,
				  arg_num(cmdline, "kvmmem.reset=", 0) != 0, steps_left);
}
