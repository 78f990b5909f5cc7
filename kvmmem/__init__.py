"""kvmmem: a virtio-mem device for Python KVM VMMs, whose memory reaches the
guest through many KVM memslots that follow what the guest has plugged."""

__version__ = "0.1.0"
