/*
 * The part of the KVM ABI that kvmmem uses, as cffi declarations.
 *
 * Read by build_kvm.py and compiled in cffi's API mode against
 * <linux/kvm.h> plus kvm_compat.h: every "..." leaves a value or a layout to
 * the C compiler, so struct offsets and ioctl numbers are checked at build
 * time instead of being written down here.
 */

/* the kernel's fixed-width types; the compiler supplies their exact types */
typedef int... __u8;
typedef int... __u16;
typedef int... __u32;
typedef int... __s32;
typedef int... __u64;
typedef int... __s64;

/* ioctl request numbers */
#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_CHECK_EXTENSION ...
#define KVM_GET_VCPU_MMAP_SIZE ...
#define KVM_GET_SUPPORTED_CPUID ...
#define KVM_SET_USER_MEMORY_REGION ...
#define KVM_SET_USER_MEMORY_REGION2 ...
#define KVM_GET_DIRTY_LOG ...
#define KVM_CLEAR_DIRTY_LOG ...
#define KVM_CREATE_VCPU ...
#define KVM_SET_TSS_ADDR ...
#define KVM_SET_IDENTITY_MAP_ADDR ...
#define KVM_CREATE_IRQCHIP ...
#define KVM_CREATE_PIT2 ...
#define KVM_GET_PIT2 ...
#define KVM_SET_PIT2 ...
#define KVM_IRQ_LINE ...
#define KVM_IRQFD ...
#define KVM_IOEVENTFD ...
#define KVM_ENABLE_CAP ...
#define KVM_RUN ...
#define KVM_GET_REGS ...
#define KVM_SET_REGS ...
#define KVM_GET_SREGS ...
#define KVM_SET_SREGS ...
#define KVM_SET_CPUID2 ...
#define KVM_GET_LAPIC ...
#define KVM_SET_LAPIC ...
#define KVM_GET_MP_STATE ...
#define KVM_SET_MP_STATE ...
#define KVM_GET_VCPU_EVENTS ...
#define KVM_SET_VCPU_EVENTS ...
#define KVM_GET_IRQCHIP ...
#define KVM_SET_IRQCHIP ...
#define KVM_GET_XSAVE ...
#define KVM_SET_XSAVE ...
#define KVM_GET_XCRS ...
#define KVM_SET_XCRS ...
#define KVM_GET_DEBUGREGS ...
#define KVM_SET_DEBUGREGS ...
#define KVM_GET_MSR_INDEX_LIST ...
#define KVM_GET_MSRS ...
#define KVM_SET_MSRS ...
#define KVM_GET_CLOCK ...
#define KVM_SET_CLOCK ...

/* API version and capabilities */
#define KVM_API_VERSION ...
#define KVM_CAP_NR_MEMSLOTS ...
#define KVM_CAP_CHECK_EXTENSION_VM ...
#define KVM_CAP_USER_MEMORY ...
#define KVM_CAP_USER_MEMORY2 ...
#define KVM_CAP_MEMORY_FAULT_INFO ...
#define KVM_CAP_GUEST_MEMFD ...
#define KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 ...
#define KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE ...
#define KVM_CAP_IRQCHIP ...
#define KVM_CAP_IRQFD ...
#define KVM_CAP_IOEVENTFD ...
#define KVM_CAP_PIT2 ...
#define KVM_CAP_NR_VCPUS ...
#define KVM_CAP_MAX_VCPUS ...
#define KVM_CAP_IMMEDIATE_EXIT ...
#define KVM_CAP_READONLY_MEM ...
#define KVM_CAP_SET_IDENTITY_MAP_ADDR ...
#define KVM_CAP_HALT_POLL ...

/* vCPU run states and irqchip ids */
#define KVM_MP_STATE_RUNNABLE ...
#define KVM_IRQCHIP_PIC_MASTER ...
#define KVM_IRQCHIP_PIC_SLAVE ...
#define KVM_IRQCHIP_IOAPIC ...

/* memslot flags */
#define KVM_MEM_LOG_DIRTY_PAGES ...
#define KVM_MEM_READONLY ...
#define KVM_MEM_GUEST_MEMFD ...

/* exit reasons */
#define KVM_EXIT_UNKNOWN ...
#define KVM_EXIT_EXCEPTION ...
#define KVM_EXIT_IO ...
#define KVM_EXIT_HYPERCALL ...
#define KVM_EXIT_DEBUG ...
#define KVM_EXIT_HLT ...
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_IRQ_WINDOW_OPEN ...
#define KVM_EXIT_SHUTDOWN ...
#define KVM_EXIT_FAIL_ENTRY ...
#define KVM_EXIT_INTR ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_SYSTEM_EVENT ...
#define KVM_EXIT_MEMORY_FAULT ...
#define KVM_EXIT_IO_IN ...
#define KVM_EXIT_IO_OUT ...
#define KVM_SYSTEM_EVENT_SHUTDOWN ...
#define KVM_SYSTEM_EVENT_RESET ...
#define KVM_SYSTEM_EVENT_CRASH ...
#define KVM_MEMORY_EXIT_FLAG_PRIVATE ...
#define KVM_INTERNAL_ERROR_EMULATION ...
#define KVM_INTERNAL_ERROR_SIMUL_EX ...
#define KVM_INTERNAL_ERROR_DELIVERY_EV ...
#define KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON ...
#define KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES ...

/* flags of irqfd, ioeventfd and the PIT */
#define KVM_IRQFD_FLAG_DEASSIGN ...
#define KVM_IOEVENTFD_FLAG_DATAMATCH ...
#define KVM_IOEVENTFD_FLAG_PIO ...
#define KVM_IOEVENTFD_FLAG_DEASSIGN ...
#define KVM_PIT_SPEAKER_DUMMY ...

struct kvm_userspace_memory_region {
    __u32 slot;
    __u32 flags;
    __u64 guest_phys_addr;
    __u64 memory_size;
    __u64 userspace_addr;
};

struct kvm_userspace_memory_region2 {
    __u32 slot;
    __u32 flags;
    __u64 guest_phys_addr;
    __u64 memory_size;
    __u64 userspace_addr;
    __u64 guest_memfd_offset;
    __u32 guest_memfd;
    ...;
};

struct kvm_dirty_log {
    __u32 slot;
    void *dirty_bitmap;
    ...;
};

struct kvm_clear_dirty_log {
    __u32 slot;
    __u32 num_pages;
    __u64 first_page;
    void *dirty_bitmap;
    ...;
};

struct kvm_regs {
    __u64 rax, rbx, rcx, rdx;
    __u64 rsi, rdi, rsp, rbp;
    __u64 r8, r9, r10, r11;
    __u64 r12, r13, r14, r15;
    __u64 rip, rflags;
};

struct kvm_segment {
    __u64 base;
    __u32 limit;
    __u16 selector;
    __u8 type;
    __u8 present, dpl, db, s, l, g, avl;
    __u8 unusable;
    ...;
};

struct kvm_dtable {
    __u64 base;
    __u16 limit;
    ...;
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8;
    __u64 efer;
    __u64 apic_base;
    __u64 interrupt_bitmap[...];
};

struct kvm_cpuid_entry2 {
    __u32 function;
    __u32 index;
    __u32 flags;
    __u32 eax;
    __u32 ebx;
    __u32 ecx;
    __u32 edx;
    ...;
};

struct kvm_cpuid2 {
    __u32 nent;
    struct kvm_cpuid_entry2 entries[];
    ...;
};

struct kvm_pit_config {
    __u32 flags;
    ...;
};

struct kvm_pit_channel_state {
    __u32 count;
    __u16 latched_count;
    __u8 count_latched;
    __u8 status_latched;
    __u8 status;
    __u8 read_state;
    __u8 write_state;
    __u8 write_latch;
    __u8 rw_mode;
    __u8 mode;
    __u8 bcd;
    __u8 gate;
    __s64 count_load_time;
};

struct kvm_pit_state2 {
    struct kvm_pit_channel_state channels[3];
    __u32 flags;
    ...;
};

struct kvm_irq_level {
    __u32 irq;
    __u32 level;
};

struct kvm_irqfd {
    __u32 fd;
    __u32 gsi;
    __u32 flags;
    __u32 resamplefd;
    ...;
};

struct kvm_ioeventfd {
    __u64 datamatch;
    __u64 addr;
    __u32 len;
    __s32 fd;
    __u32 flags;
    ...;
};

struct kvm_enable_cap {
    __u32 cap;
    __u32 flags;
    __u64 args[4];
    ...;
};

/* Saved and restored whole on reset; the compiler knows their layout. */
struct kvm_lapic_state {
    char regs[...];
};

struct kvm_mp_state {
    __u32 mp_state;
};

struct kvm_vcpu_events {
    ...;
};

struct kvm_irqchip {
    __u32 chip_id;
    ...;
};

/* vCPU and VM state that a snapshot saves and restores whole. */
struct kvm_xsave {
    ...;
};

struct kvm_xcrs {
    ...;
};

struct kvm_debugregs {
    ...;
};

struct kvm_clock_data {
    __u64 clock;
    __u32 flags;
    ...;
};

struct kvm_msr_entry {
    __u32 index;
    __u32 reserved;
    __u64 data;
};

struct kvm_msrs {
    __u32 nmsrs;
    __u32 pad;
    struct kvm_msr_entry entries[];
};

struct kvm_msr_list {
    __u32 nmsrs;
    __u32 indices[];
};

/* The shared vCPU page: only the members kvmmem reads or writes. */
struct kvm_run {
    __u8 request_interrupt_window;
    __u8 immediate_exit;
    __u32 exit_reason;
    __u8 ready_for_interrupt_injection;
    __u8 if_flag;
    __u64 cr8;
    __u64 apic_base;
    union {
        struct {
            __u64 hardware_exit_reason;
        } hw;
        struct {
            __u64 hardware_entry_failure_reason;
            __u32 cpu;
        } fail_entry;
        struct {
            __u32 exception;
            __u32 error_code;
        } ex;
        struct {
            __u8 direction;
            __u8 size;
            __u16 port;
            __u32 count;
            __u64 data_offset;
        } io;
        struct {
            __u64 phys_addr;
            __u8 data[8];
            __u32 len;
            __u8 is_write;
        } mmio;
        struct {
            __u32 suberror;
            __u32 ndata;
            __u64 data[16];
        } internal;
        struct {
            __u32 type;
            __u32 ndata;
            __u64 data[16];
        } system_event;
        char padding[256];
    };
    ...;
};

struct kvmmem_memory_fault {
    __u64 flags;
    __u64 gpa;
    __u64 size;
};

/* helpers defined in build_kvm.py; errno is read through ffi.errno */
int kvmmem_ioctl_ptr(int fd, unsigned long request, void *arg);
int kvmmem_ioctl_int(int fd, unsigned long request, unsigned long arg);
int kvmmem_range_mapped(__u64 addr, __u64 size);
void *kvmmem_run_exit_data(struct kvm_run *run);
