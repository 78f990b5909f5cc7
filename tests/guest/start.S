/*
 * Entry and trap stubs of the kvmmem test guest.
 *
 * _start is entered per kvmmem's boot contract (Linux x86-64 64-bit boot
 * protocol): long mode, interrupts off, RSI = zero page. It moves to the
 * guest's own stack and calls guest_main(zero_page), which never returns.
 */
	.section .text.start, "ax"
	.code64
	.globl	_start
_start:
	cli
	cld
	movq	$stack_top, %rsp
	movq	%rsi, %rdi
	call	guest_main
1:	hlt
	jmp	1b

/* The registers a C function may clobber (SysV ABI), around a call from a trap. */
	.macro	SAVE_SCRATCH
	pushq	%rax
	pushq	%rcx
	pushq	%rdx
	pushq	%rsi
	pushq	%rdi
	pushq	%r8
	pushq	%r9
	pushq	%r10
	pushq	%r11
	.endm
	.macro	RESTORE_SCRATCH
	popq	%r11
	popq	%r10
	popq	%r9
	popq	%r8
	popq	%rdi
	popq	%rsi
	popq	%rdx
	popq	%rcx
	popq	%rax
	.endm

	.text
/* Exceptions 0-31: one 16-byte stub each, exc_stubs + 16 * vector. */
	.globl	exc_stubs
	.balign	16
exc_stubs:
	.set	vec, 0
	.rept	32
	.balign	16
	movl	$vec, %edi
	movq	%rsp, %rsi
	jmp	trap_fatal
	.set	vec, vec + 1
	.endr

/* Any vector without its own handler. */
	.globl	unexpected_stub
unexpected_stub:
	movl	$0x100, %edi
	movq	%rsp, %rsi
	jmp	trap_fatal

/* The virtio-mmio device's vector: save what C may clobber, call irq_handler. */
	.globl	irq_stub
irq_stub:
	SAVE_SCRATCH
	cld
	call	irq_handler
	RESTORE_SCRATCH
	iretq

/* Page faults (vector 14, with an error code): page_fault(cr2, frame)
 * maps device memory on first touch and returns, or reports and exits. The
 * 8 bytes below the saved registers keep the stack 16-aligned at the call. */
	.globl	pf_stub
pf_stub:
	SAVE_SCRATCH
	subq	$8, %rsp
	cld
	movq	%cr2, %rdi
	leaq	80(%rsp), %rsi
	call	page_fault
	addq	$8, %rsp
	RESTORE_SCRATCH
	addq	$8, %rsp		/* the error code */
	iretq

/* LAPIC spurious vector: no EOI. */
	.globl	spurious_stub
spurious_stub:
	iretq

	.bss
	.balign	16
stack:
	.skip	16384
stack_top:

	.section .note.GNU-stack, "", @progbits
