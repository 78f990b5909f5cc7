/*
 * The virtio-mmio transport (VIRTIO 1.2 section 4.2.3, version 2) and one
 * split virtqueue (section 2.7), shared by the test guest's virtio-mem and
 * virtio-blk drivers. Completions are polled: the driver sets
 * VIRTQ_AVAIL_F_NO_INTERRUPT and watches the used ring.
 */
#include "guest.h"

static void set_status(u64 base, u32 bits) { wr32(base + VM_STATUS, rd32(base + VM_STATUS) | bits); }

/* Section 3.1.1, the driver's initialisation sequence. */
u64 virtio_init(struct virtq *q, u64 base, u64 wanted)
{
	q->base = base;
	wr32(base + VM_STATUS, 0);
	set_status(base, S_ACKNOWLEDGE);
	set_status(base, S_DRIVER);
	wr32(base + VM_DEV_FEATURES_SEL, 0);
	u64 offered = rd32(base + VM_DEV_FEATURES);
	wr32(base + VM_DEV_FEATURES_SEL, 1);
	offered |= (u64)rd32(base + VM_DEV_FEATURES) << 32;
	q->offered = offered;
	if (!(offered & F_VERSION_1))
		fail("device does not offer VIRTIO_F_VERSION_1");
	wanted = offered & (wanted | F_VERSION_1);
	wr32(base + VM_DRV_FEATURES_SEL, 0);
	wr32(base + VM_DRV_FEATURES, (u32)wanted);
	wr32(base + VM_DRV_FEATURES_SEL, 1);
	wr32(base + VM_DRV_FEATURES, wanted >> 32);
	set_status(base, S_FEATURES_OK);
	if (!(rd32(base + VM_STATUS) & S_FEATURES_OK))
		fail("device refused FEATURES_OK");

	wr32(base + VM_QUEUE_SEL, 0);
	u32 max = rd32(base + VM_QUEUE_NUM_MAX);
	if (!max || rd32(base + VM_QUEUE_READY))
		fail("queue 0 is not available");
	for (q->size = QMAX; q->size > max; q->size >>= 1)
		;
	wr32(base + VM_QUEUE_NUM, q->size);
	q->avail.flags = 1;	/* VIRTQ_AVAIL_F_NO_INTERRUPT: completions are polled */
	q->avail.idx = q->used.idx = q->last_used = 0;
	u64 areas[3] = { (u64)q->desc, (u64)&q->avail, (u64)&q->used };
	for (int i = 0; i < 3; i++) {
		wr32(base + VM_QUEUE_DESC + 0x10 * i, (u32)areas[i]);
		wr32(base + VM_QUEUE_DESC + 0x10 * i + 4, areas[i] >> 32);
	}
	wr32(base + VM_QUEUE_READY, 1);
	set_status(base, S_DRIVER_OK);
	return wanted;
}

/* Give up on a device after about 2^37 TSC cycles (tens of seconds). */
#define TIMEOUT_TSC (1UL << 37)

/* Make the chain at desc[head] available and notify the device. */
void virtq_post(struct virtq *q, u16 head)
{
	q->avail.ring[q->avail.idx % q->size] = head;
	barrier();
	q->avail.idx++;
	barrier();
	wr32(q->base + VM_QUEUE_NOTIFY, 0);
}

/*
 * Poll the used ring for the next completion. A device served in the VMM
 * has answered by the time the notify write returns; one served by another
 * process (vhost-user) answers a little later, so the loop spins on the ring
 * in memory and only every 256th turn reads Status (an exit to the VMM) to
 * see DEVICE_NEEDS_RESET, and the TSC for the timeout.
 */
int virtq_wait(struct virtq *q)
{
	u64 start = 0;
	for (u32 spins = 0;; spins++) {
		if (*(volatile u16 *)&q->used.idx != q->last_used) {
			q->last_used++;
			barrier();
			return 0;
		}
		if (!(spins & 255)) {
			if (rd32(q->base + VM_STATUS) & S_NEEDS_RESET)
				return -1;
			if (!start)
				start = rdtsc();
			else if (rdtsc() - start > TIMEOUT_TSC)
				fail("timeout waiting for the device");
		}
		__asm__ volatile("pause");
	}
}

int virtq_run(struct virtq *q, u16 head)
{
	virtq_post(q, head);
	return virtq_wait(q);
}
