"""Memory devices: the virtio-mem device, its wire format, device memory and memslot planning."""
