"""virtio transports: virtio-mmio and split virtqueues."""
