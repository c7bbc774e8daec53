/* SPDX-License-Identifier: Apache-2.0 */
/*
 * getcontext, setcontext and swapcontext for x86_64 (System V ABI), plus the
 * trampoline that makecontext'd functions return into.
 *
 * A context holds what a function call must preserve: rbx, rbp, r12-r15, the stack
 * pointer and the resume address, the x87 control word and MXCSR, and the signal mask.
 * The six argument registers are saved and restored as well, because makecontext
 * passes the entry function's first arguments through them.
 */
#include "layout.h"

/* Start a global function NAME. */
#define FUNCTION(name)        \
	.globl name;              \
	.type name, @function;    \
	.p2align 4;               \
name:                         \
	.cfi_startproc

/* End function NAME and export it under the standard name ALIAS as well. */
#define END_WITH_ALIAS(name, alias) \
	.cfi_endproc;                   \
	.size name, . - name;           \
	.globl alias;                   \
	.type alias, @function;         \
	.set alias, name;               \
	.size alias, . - name

/*
 * Store the caller's state into the ucontext_t at UC. Used at function entry, when
 * (%rsp) is the return address: resuming the context returns from this call.
 * Clobbers rax.
 */
.macro SAVE_CONTEXT uc
	movq	%rbx, GREG(RBX)(\uc)
	movq	%rbp, GREG(RBP)(\uc)
	movq	%r12, GREG(R12)(\uc)
	movq	%r13, GREG(R13)(\uc)
	movq	%r14, GREG(R14)(\uc)
	movq	%r15, GREG(R15)(\uc)
	movq	%rdi, GREG(RDI)(\uc)
	movq	%rsi, GREG(RSI)(\uc)
	movq	%rdx, GREG(RDX)(\uc)
	movq	%rcx, GREG(RCX)(\uc)
	movq	%r8, GREG(R8)(\uc)
	movq	%r9, GREG(R9)(\uc)
	movq	(%rsp), %rax			/* resume at the return address... */
	movq	%rax, GREG(RIP)(\uc)
	leaq	8(%rsp), %rax			/* ...with the stack as it is after the return */
	movq	%rax, GREG(RSP)(\uc)
	/* FP control state goes to the context's own save area, as on a signal frame. */
	leaq	UC_FPREGS_MEM(\uc), %rax
	movq	%rax, UC_FPREGS(\uc)
	fnstcw	FP_CWD(%rax)
	stmxcsr	FP_MXCSR(%rax)
.endm

/* rt_sigprocmask(how, set, oldset, KSIGSET_SIZE); the caller sets rdi, rsi and rdx. */
.macro SIGPROCMASK_SYSCALL
	movl	$KSIGSET_SIZE, %r10d
	movl	$NR_RT_SIGPROCMASK, %eax
	syscall
	cmpq	$-4095, %rax			/* -4095..-1 is -errno */
	jae	.Lsyscall_failed
.endm

	.text

/* int getcontext(ucontext_t *ucp) */
FUNCTION(libucontext_getcontext)
	SAVE_CONTEXT %rdi
	/* Read the current signal mask into ucp->uc_sigmask (blocking nothing more). */
	leaq	UC_SIGMASK(%rdi), %rdx
	xorl	%esi, %esi
	movl	$KSIG_BLOCK, %edi
	SIGPROCMASK_SYSCALL
	xorl	%eax, %eax
	ret
END_WITH_ALIAS(libucontext_getcontext, getcontext)

/* int setcontext(const ucontext_t *ucp) */
FUNCTION(libucontext_setcontext)
.Lsetcontext:
	/* The signal mask comes first: it is the only step that can fail. */
	movq	%rdi, %r8			/* keep ucp; syscall preserves r8 */
	leaq	UC_SIGMASK(%rdi), %rsi
	xorl	%edx, %edx
	movl	$KSIG_SETMASK, %edi
	SIGPROCMASK_SYSCALL
	movq	%r8, %rdx

/* Resume the context at rdx; the signal mask is already in place. */
.Lrestore:
	movq	UC_FPREGS(%rdx), %rax		/* contexts without FP state leave it alone */
	testq	%rax, %rax
	jz	1f
	fldcw	FP_CWD(%rax)
	ldmxcsr	FP_MXCSR(%rax)
1:
	movq	GREG(RSP)(%rdx), %rsp
	movq	GREG(RBX)(%rdx), %rbx
	movq	GREG(RBP)(%rdx), %rbp
	movq	GREG(R12)(%rdx), %r12
	movq	GREG(R13)(%rdx), %r13
	movq	GREG(R14)(%rdx), %r14
	movq	GREG(R15)(%rdx), %r15
	movq	GREG(RDI)(%rdx), %rdi
	movq	GREG(RSI)(%rdx), %rsi
	movq	GREG(RCX)(%rdx), %rcx
	movq	GREG(R8)(%rdx), %r8
	movq	GREG(R9)(%rdx), %r9
	/*
	 * Jump through r11 (scratch, not an argument register) rather than pushing the
	 * address: the target's stack may have live data just below its stack pointer.
	 */
	movq	GREG(RIP)(%rdx), %r11
	movq	GREG(RDX)(%rdx), %rdx		/* the base register goes last */
	xorl	%eax, %eax			/* a resumed getcontext/swapcontext returns 0 */
	jmp	*%r11
END_WITH_ALIAS(libucontext_setcontext, setcontext)

/* int swapcontext(ucontext_t *oucp, const ucontext_t *ucp) */
FUNCTION(libucontext_swapcontext)
	SAVE_CONTEXT %rdi
	/* One call saves the current mask into oucp and installs the one of ucp. */
	movq	%rsi, %r8			/* keep ucp; syscall preserves r8 */
	leaq	UC_SIGMASK(%rdi), %rdx
	leaq	UC_SIGMASK(%rsi), %rsi
	movl	$KSIG_SETMASK, %edi
	SIGPROCMASK_SYSCALL
	movq	%r8, %rdx
	jmp	.Lrestore
END_WITH_ALIAS(libucontext_swapcontext, swapcontext)

/*
 * Failure exit shared by the functions above, reached by a jump with their stack
 * untouched and -errno in rax: set errno and return -1 to their caller.
 */
	.p2align 4
.Lsyscall_failed:
	.cfi_startproc
	negl	%eax
	pushq	%rax				/* keep the error; also aligns the stack for the call */
	.cfi_adjust_cfa_offset 8
	call	__errno_location@PLT
	popq	%rcx
	.cfi_adjust_cfa_offset -8
	movl	%ecx, (%rax)
	movl	$-1, %eax
	ret
	.cfi_endproc

/*
 * makecontext() makes the entry function return here, with rsp 16-byte aligned and
 * rbx (callee-saved, so the entry function preserved it) holding uc_link.
 * Resume uc_link, or end the process with status 0 when there is none.
 */
	.globl __libucontext_trampoline
	.hidden __libucontext_trampoline
	.type __libucontext_trampoline, @function
	.p2align 4
	.cfi_startproc
	.cfi_undefined rip			/* outermost frame: unwinders stop here */
	nop					/* return address - 1, which unwinders look up, is this byte */
__libucontext_trampoline:
	testq	%rbx, %rbx
	jz	1f
	movq	%rbx, %rdi
	call	.Lsetcontext
	call	abort@PLT			/* setcontext returned: uc_link is unusable */
1:
	xorl	%edi, %edi
	call	exit@PLT
	hlt
	.cfi_endproc
	.size __libucontext_trampoline, . - __libucontext_trampoline

	.section .note.GNU-stack, "", @progbits
