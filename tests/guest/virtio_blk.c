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

/* One request of IO_SIZE bytes at sector from/to buf; the status byte. */
static u8 blk_io(u32 type, u64 sector, u64 buf)
{
	hdr = (struct blk_hdr){ type, 0, sector };
	q.desc[0] = (struct desc){ (u64)&hdr, sizeof(hdr), D_NEXT, 1 };
	q.desc[1] = (struct desc){ buf, IO_SIZE, D_NEXT | (type == T_IN ? D_WRITE : 0), 2 };
	q.desc[2] = (struct desc){ (u64)&status, 1, D_WRITE, 0 };
	status = 0xff;
	if (virtq_run(&q, 0))
		fail("error: virtio-blk device needs reset");
	return status;
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

static void fill(u64 buf, u64 disk_offset, u64 invert)
{
	for (u64 i = 0; i < IO_SIZE; i += 8)
		wr64(buf + i, (disk_offset + i) ^ BLK_KEY ^ invert);
}

void blk_rounds(u64 base, u64 rounds)
{
	/* BLK_SIZE is accepted only to read blk_size (5.2.4: the field is
	 * there with the feature); RO is never accepted, and refused below. */
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
	if (capacity < 8 * (rounds + 1) + IO_SIZE / 512)
		fail("error: the disk is too small for kvmmem.blk=");

	struct mem_config c;
	mem_read_config(&c);
	u64 bs = c.block_size;
	u64 stride = c.usable / (2 * rounds) & ~(bs - 1);
	if (bs < 2 * IO_SIZE || !stride)
		fail("error: the usable region is too small for kvmmem.blk=");
	if (c.plugged && mem_request(UNPLUG_ALL, 0, 0) != ACK)
		fail("error: UNPLUG_ALL refused");

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
		if (st != 0) {
			puts("error: virtio-blk status "); putdec(st);
			fail("");
		}
		for (u64 i = 0; i < IO_SIZE; i += 8) {
			u64 v = rd64(rbuf + i);
			if (v != ((sector * 512 + i) ^ BLK_KEY)) {
				puts("blk mismatch at "); puthex(rbuf + i); puts(": "); puthex(v); putc('\n');
				finish(1);
			}
		}
		puts("blk round "); putdec(r); puts(": sector "); putdec(sector);
		puts(" written from "); puthex(wbuf); puts(" read into "); puthex(rbuf); puts(" ok\n");
		mem_block(UNPLUG, w);
		mem_block(UNPLUG, rd);
	}
	puts("blk: "); putdec(rounds); puts(" rounds done\n");
	finish(0);
}
