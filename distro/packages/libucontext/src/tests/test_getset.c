/* SPDX-License-Identifier: Apache-2.0 */
/* getcontext/setcontext round trips, including into a makecontext'd function. */
#include <errno.h>
#include <fenv.h>
#include <sys/mman.h>

#include "libucontext/libucontext.h"
#include "check.h"

/* getcontext returns again after each setcontext; static state survives that. */
static volatile int rounds, phase, reached;
static ucontext_t saved, fiber_ctx;

static void test_round_trip(void)
{
	rounds = 0;
	CHECK(libucontext_getcontext(&saved) == 0);
	rounds++;
	if (rounds < 5) {
		libucontext_setcontext(&saved);
		CHECK(!"setcontext returned");
	}
	CHECK(rounds == 5);
}

#if defined(__x86_64__)
static unsigned short x87_control(void)
{
	unsigned short cw;
	__asm__ volatile("fnstcw %0" : "=m"(cw));
	return cw;
}

static unsigned mxcsr(void)
{
	unsigned v;
	__asm__ volatile("stmxcsr %0" : "=m"(v));
	return v & ~0x3fU;  /* ignore the exception flags */
}
#endif

/* The floating-point control state saved by getcontext comes back with setcontext. */
static void test_fp_control(void)
{
#if defined(__x86_64__)
	unsigned short cw = x87_control();
	unsigned csr = mxcsr();
#endif

	CHECK(fegetround() == FE_TONEAREST);
	phase = 0;
	CHECK(libucontext_getcontext(&saved) == 0);
	if (phase == 0) {
		phase = 1;
		CHECK(fesetround(FE_UPWARD) == 0);
		CHECK(fegetround() == FE_UPWARD);
		libucontext_setcontext(&saved);
		CHECK(!"setcontext returned");
	}
	CHECK(fegetround() == FE_TONEAREST);
#if defined(__x86_64__)
	CHECK(x87_control() == cw);
	CHECK(mxcsr() == csr);
#endif
}

static void target(int value, int other)
{
	reached = value + other;
}

/* setcontext into a fresh context, which comes back through uc_link. */
static void test_into_function(void)
{
	char *stack = new_stack();

	phase = 0;
	reached = 0;
	CHECK(libucontext_getcontext(&saved) == 0);
	if (phase == 0) {
		phase = 1;
		CHECK(libucontext_getcontext(&fiber_ctx) == 0);
		fiber_ctx.uc_stack.ss_sp = stack;
		fiber_ctx.uc_stack.ss_size = STACK_SIZE;
		fiber_ctx.uc_link = &saved;
		libucontext_makecontext(&fiber_ctx, (void (*)(void))target, 2, 70, 7);
		libucontext_setcontext(&fiber_ctx);
		CHECK(!"setcontext returned");
	}
	CHECK(phase == 1 && reached == 77);
	free(stack);
}

/* A context the kernel cannot read fails cleanly: -1, errno set, caller intact. */
static void test_errors(void)
{
	ucontext_t here;
	void *page = mmap(NULL, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	const ucontext_t *unreadable = page;

	CHECK(page != MAP_FAILED);
	errno = 0;
	CHECK(libucontext_setcontext(unreadable) == -1);
	CHECK(errno == EFAULT);
	errno = 0;
	CHECK(libucontext_swapcontext(&here, unreadable) == -1);
	CHECK(errno == EFAULT);
	CHECK(munmap(page, 4096) == 0);
}

int main(void)
{
	test_start();
	test_round_trip();
	test_fp_control();
	test_into_function();
	test_errors();
	return test_done();
}
