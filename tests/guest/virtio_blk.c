/*
 * The test guest's virtio-blk driver (VIRTIO 1.2 section 5.2, one request
 * queue) and the rounds of kvmmem.blk=N that prove block I/O goes through
 * memory the guest has just plugged into the virtio-mem device:
 *
 *   round r: plug one block W and one block R (PLUG, one block each),
 *   fill a buffer in W with the pattern of sector S = 8 * (r + 1), write it
 *   there (VIRTIO_BLK_T_OUT), fill a buffer in R with the pattern's
 *   complement, read the sector into it (VIRTIO_BLK_T_IN), compare, unplug
 *   W and R.
 *
 * The usable region is cut into 2N equal strides; W is the first block of
 * stride r and R that of stride N + r, so that in a usable region of a few
 * memslots W and R lie in different ones and each round maps other ones.
 *
 * The pattern's 64-bit word at byte offset o of the disk is o ^ BLK_KEY, so
 * the host can check the image file without knowing the guest's addresses.
 *
 * Lines:
 *   virtio-blk: features=0x<f> capacity=<sectors> blk_size=<bytes>
 *   blk round <r>: sector <S> written from 0x<W buffer> read into 0x<R buffer> ok
 *   blk: <N> rounds done                      (then exit 0)
 *   blk mismatch at 0x<addr>: 0x<value> / error: ...   (then exit 1)
 */
#include "guest.h"

#define BLK_KEY 0x6b766d6d626c6b00UL	/* "kvmmblk" */
#define IO_SIZE 4096			/* one transfer: a multiple of any blk_size <= 4 KiB */

#define F_RO (1UL << 5)			/* VIRTIO_BLK_F_RO */
#define F_BLK_SIZE (1UL << 6)		/* VIRTIO_BLK_F_BLK_SIZE */
enum { T_IN = 0, T_OUT = 1 };		/* VIRTIO_BLK_T_IN / _OUT */

/* struct virtio_blk_req (5.2.6): header, data, status in three descriptors */
struct blk_hdr { u32 type, reserved; u64 sector; };
_Static_assert(sizeof(struct blk_hdr) == 16, "virtio_blk_req header is 16 bytes");

static struct virtq q;
static struct blk_hdr hdr;
static volatile u8 status;

/* Post one request of size bytes at sector from/to buf (descriptors 0-2). */
static void blk_post(u32 type, u64 sector, u64 buf, u32 size)
{
	hdr = (struct blk_hdr){ type, 0, sector };
	q.desc[0] = (struct desc){ (u64)&hdr, sizeof(hdr), D_NEXT, 1 };
	q.desc[1] = (struct desc){ buf, size, D_NEXT | (type == T_IN ? D_WRITE : 0), 2 };
	q.desc[2] = (struct desc){ (u64)&status, 1, D_WRITE, 0 };
	status = 0xff;
	virtq_post(&q, 0);
}

/* Wait for the posted request; its status byte. */
static u8 blk_wait(void)
{
	if (virtq_wait(&q))
		fail("error: virtio-blk device needs reset");
	return status;
}

/* One request of IO_SIZE bytes at sector from/to buf; the status byte. */
static u8 blk_io(u32 type, u64 sector, u64 buf)
{
	blk_post(type, sector, buf, IO_SIZE);
	return blk_wait();
}

static void mem_block(u16 type, u64 addr)
{
	int r = mem_request(type, addr, 1);
	if (r != ACK) {
		puts("error: virtio-mem request type "); putdec(type); puts(" addr "); puthex(addr);
		puts(" answered "); putdec(r);
		fail("");
	}
}

static void fill_n(u64 buf, u64 disk_offset, u64 invert, u64 size)
{
	for (u64 i = 0; i < size; i += 8)
		wr64(buf + i, (disk_offset + i) ^ BLK_KEY ^ invert);
}

static void fill(u64 buf, u64 disk_offset, u64 invert) { fill_n(buf, disk_offset, invert, IO_SIZE); }

/* A transfer's end: its status must be 0 (else fail) and buf must hold the
 * pattern of disk_offset (else print the first wrong word and exit 1). */
static void check_read(u8 st, u64 buf, u64 disk_offset, u64 size)
{
	if (st != 0) {
		puts("error: virtio-blk status "); putdec(st);
		fail("");
	}
	for (u64 i = 0; i < size; i += 8)
		if (rd64(buf + i) != ((disk_offset + i) ^ BLK_KEY)) {
			puts("blk mismatch at "); puthex(buf + i); puts(": "); puthex(rd64(buf + i));
			putc('\n');
			finish(1);
		}
}

static void blk_setup(u64 base, u64 sectors_needed, struct mem_config *c)
{
	u64 features = virtio_init(&q, base, F_BLK_SIZE);
	u64 capacity = cfg64(&q, 0);
	u32 blk_size = features & F_BLK_SIZE ? cfg32(&q, 20) : 512;
	puts("virtio-blk: features="); puthex(features); puts(" capacity="); putdec(capacity);
	puts(" blk_size="); putdec(blk_size); putc('\n');
	if (q.offered & F_RO)
		fail("error: the virtio-blk device is read-only");
	if (q.size < 3)
		fail("error: the virtio-blk queue holds fewer than 3 descriptors");
	if (!blk_size || IO_SIZE % blk_size)
		fail("error: blk_size does not divide 4096");
	if (capacity < sectors_needed)
		fail("error: the disk is too small");
	mem_read_config(c);
	if (c->plugged && mem_request(UNPLUG_ALL, 0, 0) != ACK)
		fail("error: UNPLUG_ALL refused");
}

void blk_rounds(u64 base, u64 rounds)
{
	/* BLK_SIZE is accepted only to read blk_size (5.2.4: the field is
	 * there with the feature); RO is never accepted, and refused below. */
	struct mem_config c;
	blk_setup(base, 8 * (rounds + 1) + IO_SIZE / 512, &c);
	u64 bs = c.block_size;
	u64 stride = c.usable / (2 * rounds) & ~(bs - 1);
	if (bs < 2 * IO_SIZE || !stride)
		fail("error: the usable region is too small for kvmmem.blk=");

	for (u64 r = 0; r < rounds; r++) {
		u64 w = c.addr + r * stride, rd = c.addr + (rounds + r) * stride;
		u64 wbuf = w + bs / 2, rbuf = rd + bs / 2, sector = 8 * (r + 1);
		mem_block(PLUG, w);
		mem_block(PLUG, rd);
		fill(wbuf, sector * 512, 0);
		fill(rbuf, sector * 512, ~0UL);
		u8 st = blk_io(T_OUT, sector, wbuf);
		if (st == 0)
			st = blk_io(T_IN, sector, rbuf);
		check_read(st, rbuf, sector * 512, IO_SIZE);
		puts("blk round "); putdec(r); puts(": sector "); putdec(sector);
		puts(" written from "); puthex(wbuf); puts(" read into "); puthex(rbuf); puts(" ok\n");
		mem_block(UNPLUG, w);
		mem_block(UNPLUG, rd);
	}
	puts("blk: "); putdec(rounds); puts(" rounds done\n");
	finish(0);
}

/*
 * kvmmem.blk_inflight=N: memslot changes while a large request is in flight
 * (issue 19). Round r, in the first 16 MiB of the device (blocks b0-b7 of
 * 2 MiB; with memslots=exact and merge-delay=0 the eight one-block plugs end
 * in one 16 MiB memslot): write INFLIGHT bytes of the pattern of sector
 * S = 2048 * (r + 1) from b3 and, before waiting for it, unplug b6 (exact
 * splits the 16 MiB memslot under the buffer); plug b6 again (merged again),
 * read S into b1 and, before waiting, unplug b6 (split again); check b1;
 * unplug everything. A throttled back-end keeps each request in flight for
 * the whole memslot change.
 */
#define INFLIGHT (512 * 1024)

void blk_inflight(u64 base, u64 rounds)
{
	struct mem_config c;
	blk_setup(base, 2048 * (rounds + 1) + INFLIGHT / 512, &c);
	u64 bs = c.block_size, a = c.addr;
	if (bs < 2 * INFLIGHT || c.usable < 8 * bs)
		fail("error: kvmmem.blk_inflight= needs blocks of 1 MiB and 8 of them usable");
	for (u64 r = 0; r < rounds; r++) {
		u64 sector = 2048 * (r + 1), wbuf = a + 3 * bs + bs / 4, rbuf = a + bs + bs / 4;
		for (u64 b = 0; b < 8; b++)
			mem_block(PLUG, a + b * bs);
		fill_n(wbuf, sector * 512, 0, INFLIGHT);
		fill_n(rbuf, sector * 512, ~0UL, INFLIGHT);
		blk_post(T_OUT, sector, wbuf, INFLIGHT);
		mem_block(UNPLUG, a + 6 * bs);
		u8 st = blk_wait();
		if (st == 0) {
			mem_block(PLUG, a + 6 * bs);
			blk_post(T_IN, sector, rbuf, INFLIGHT);
			mem_block(UNPLUG, a + 6 * bs);
			st = blk_wait();
		}
		check_read(st, rbuf, sector * 512, INFLIGHT);
		puts("blk inflight round "); putdec(r); puts(": sector "); putdec(sector); puts(" ok\n");
		if (mem_request(UNPLUG_ALL, 0, 0) != ACK)
			fail("error: UNPLUG_ALL refused");
	}
	puts("blk inflight: "); putdec(rounds); puts(" rounds done\n");
	finish(0);
}
