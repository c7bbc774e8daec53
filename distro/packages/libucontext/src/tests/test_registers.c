/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Every callee-saved register survives swapcontext, in both directions. Compiled code
 * uses these registers only when it happens to, so the check is written in assembly
 * for each architecture; elsewhere the test passes trivially.
 */
#include "libucontext/libucontext.h"
#include "check.h"

#if defined(__x86_64__)
/*
 * long swap_with_patterns(ucontext_t *from, const ucontext_t *to, long seed)
 *
 * Fills rbx, rbp and r12-r15 with values derived from seed, calls
 * libucontext_swapcontext(from, to) and, once resumed, returns how many of those
 * registers lost their value (plus one if swapcontext did not return 0).
 */
__asm__(
	"	.pushsection .text\n"
	"	.p2align 4\n"
	"	.type swap_with_patterns, @function\n"
	"swap_with_patterns:\n"
	"	pushq	%rbx\n"
	"	pushq	%rbp\n"
	"	pushq	%r12\n"
	"	pushq	%r13\n"
	"	pushq	%r14\n"
	"	pushq	%r15\n"
	"	pushq	%rdx\n"			/* the seed; also keeps the stack 16-byte aligned */
	"	movq	%rdx, %rbx\n"		/* register n gets seed * 16 + n */
	"	shlq	$4, %rbx\n"
	"	leaq	1(%rbx), %rbp\n"
	"	leaq	2(%rbx), %r12\n"
	"	leaq	3(%rbx), %r13\n"
	"	leaq	4(%rbx), %r14\n"
	"	leaq	5(%rbx), %r15\n"
	"	call	libucontext_swapcontext@PLT\n"
	"	testq	%rax, %rax\n"		/* result = (swapcontext failed) + lost registers */
	"	setne	%al\n"
	"	movzbl	%al, %eax\n"
	"	popq	%rdx\n"
	"	shlq	$4, %rdx\n"
	"	xorl	%ecx, %ecx\n"
	"	cmpq	%rdx, %rbx\n"
	"	setne	%cl\n"
	"	addq	%rcx, %rax\n"
	"	leaq	1(%rdx), %rsi\n"
	"	cmpq	%rsi, %rbp\n"
	"	setne	%cl\n"
	"	addq	%rcx, %rax\n"
	"	leaq	2(%rdx), %rsi\n"
	"	cmpq	%rsi, %r12\n"
	"	setne	%cl\n"
	"	addq	%rcx, %rax\n"
	"	leaq	3(%rdx), %rsi\n"
	"	cmpq	%rsi, %r13\n"
	"	setne	%cl\n"
	"	addq	%rcx, %rax\n"
	"	leaq	4(%rdx), %rsi\n"
	"	cmpq	%rsi, %r14\n"
	"	setne	%cl\n"
	"	addq	%rcx, %rax\n"
	"	leaq	5(%rdx), %rsi\n"
	"	cmpq	%rsi, %r15\n"
	"	setne	%cl\n"
	"	addq	%rcx, %rax\n"
	"	popq	%r15\n"
	"	popq	%r14\n"
	"	popq	%r13\n"
	"	popq	%r12\n"
	"	popq	%rbp\n"
	"	popq	%rbx\n"
	"	ret\n"
	"	.size swap_with_patterns, . - swap_with_patterns\n"
	"	.popsection\n");

long swap_with_patterns(ucontext_t *from, const ucontext_t *to, long seed);
#define HAVE_PATTERNS 1
#endif

#ifdef HAVE_PATTERNS
static ucontext_t main_ctx, fiber_ctx;

/* Runs with its own register values, which main's must not disturb (and back). */
static void fiber(void)
{
	for (;;)
		CHECK(swap_with_patterns(&fiber_ctx, &main_ctx, 2) == 0);
}

/* Separate from the test, which then has no getcontext call that returns twice. */
static __attribute__((noinline)) void prepare_fiber(char *stack)
{
	CHECK(libucontext_getcontext(&fiber_ctx) == 0);
	fiber_ctx.uc_stack.ss_sp = stack;
	fiber_ctx.uc_stack.ss_size = STACK_SIZE;
	fiber_ctx.uc_link = NULL;
	libucontext_makecontext(&fiber_ctx, fiber, 0);
}

static void test_callee_saved(void)
{
	char *stack = new_stack();

	prepare_fiber(stack);
	for (int i = 0; i < 4; i++)
		CHECK(swap_with_patterns(&main_ctx, &fiber_ctx, 1) == 0);
	free(stack);
}
#endif

int main(void)
{
	test_start();
#ifdef HAVE_PATTERNS
	test_callee_saved();
#else
	puts("test_registers: no register check for this architecture");
#endif
	return test_done();
}
