/*
 * KVM ABI that is newer than the <linux/kvm.h> a build machine may have.
 *
 * Debian 12 ships the headers of Linux 6.1, while the kernels kvmmem runs on
 * know KVM_SET_USER_MEMORY_REGION2, memory-fault exits and guest_memfd.  Each
 * item is defined only where the system header lacks it, and the layouts are
 * pinned with static assertions so a wrong definition cannot compile.
 */
#ifndef KVMMEM_KVM_COMPAT_H
#define KVMMEM_KVM_COMPAT_H

#include <stddef.h>
#include <linux/kvm.h>

#ifndef KVM_CAP_USER_MEMORY2
#define KVM_CAP_USER_MEMORY2 231
#endif
#ifndef KVM_CAP_MEMORY_FAULT_INFO
#define KVM_CAP_MEMORY_FAULT_INFO 232
#endif
#ifndef KVM_CAP_GUEST_MEMFD
#define KVM_CAP_GUEST_MEMFD 234
#endif
#ifndef KVM_EXIT_MEMORY_FAULT
#define KVM_EXIT_MEMORY_FAULT 39
#endif
#ifndef KVM_MEMORY_EXIT_FLAG_PRIVATE
#define KVM_MEMORY_EXIT_FLAG_PRIVATE (1ULL << 3)
#endif
#ifndef KVM_MEM_GUEST_MEMFD
#define KVM_MEM_GUEST_MEMFD (1UL << 2)
#endif

#ifndef KVM_SET_USER_MEMORY_REGION2
struct kvm_userspace_memory_region2 {
	__u32 slot;
	__u32 flags;
	__u64 guest_phys_addr;
	__u64 memory_size;
	__u64 userspace_addr;
	__u64 guest_memfd_offset;
	__u32 guest_memfd;
	__u32 pad1;
	__u64 pad2[14];
};
#define KVM_SET_USER_MEMORY_REGION2 \
	_IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)
#endif

/* The memory_fault member of kvm_run's exit union (Linux 6.8+). */
struct kvmmem_memory_fault {
	__u64 flags;
	__u64 gpa;
	__u64 size;
};

_Static_assert(sizeof(struct kvm_userspace_memory_region2) == 160,
	       "kvm_userspace_memory_region2 must be 160 bytes");
_Static_assert(offsetof(struct kvm_userspace_memory_region2, guest_memfd_offset) == 32,
	       "guest_memfd_offset must be at byte 32");
_Static_assert(sizeof(struct kvmmem_memory_fault) == 24,
	       "memory_fault exit data must be 24 bytes");
_Static_assert(offsetof(struct kvm_run, kvm_valid_regs) - offsetof(struct kvm_run, mmio) >= 256,
	       "kvm_run exit union must hold 256 bytes");

#endif /* KVMMEM_KVM_COMPAT_H */
