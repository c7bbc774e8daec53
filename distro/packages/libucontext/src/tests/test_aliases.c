/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The standard names from <ucontext.h> resolve to this library (so the other tests,
 * which call the libucontext_ names, test what programs get) and work as such.
 */
#include "libucontext/libucontext.h"
#include "check.h"

#define SAME_FUNCTION(a, b) CHECK((uintptr_t)(a) == (uintptr_t)(b))

static ucontext_t main_ctx, fiber_ctx;
static int pings;

static void pinger(int times)
{
	for (int i = 0; i < times; i++) {
		pings++;
		CHECK(swapcontext(&fiber_ctx, &main_ctx) == 0);
	}
}

int main(void)
{
	char *stack;

	test_start();
	stack = new_stack();
	SAME_FUNCTION(getcontext, libucontext_getcontext);
	SAME_FUNCTION(setcontext, libucontext_setcontext);
	SAME_FUNCTION(makecontext, libucontext_makecontext);
	SAME_FUNCTION(swapcontext, libucontext_swapcontext);

	CHECK(getcontext(&fiber_ctx) == 0);
	fiber_ctx.uc_stack.ss_sp = stack;
	fiber_ctx.uc_stack.ss_size = STACK_SIZE;
	fiber_ctx.uc_link = &main_ctx;
	makecontext(&fiber_ctx, (void (*)(void))pinger, 1, 3);
	for (int i = 1; i <= 4; i++) {
		CHECK(swapcontext(&main_ctx, &fiber_ctx) == 0);
		CHECK(pings == (i < 3 ? i : 3));
	}
	free(stack);
	return test_done();
}
