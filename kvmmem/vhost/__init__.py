"""vhost-user: a front-end for out-of-process virtio back-ends, and the memory
listener that shows them the guest's RAM memslot by memslot."""
