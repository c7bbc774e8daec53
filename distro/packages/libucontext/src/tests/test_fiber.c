/* SPDX-License-Identifier: Apache-2.0 */
/*
 * makecontext + swapcontext: functions run on their own stack, receive their
 * arguments, ping-pong with the caller, and return through uc_link.
 */
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "libucontext/libucontext.h"
#include "check.h"

static ucontext_t main_ctx, fiber_ctx;
static char *fiber_stack;

/*
 * Fill fiber_ctx with a fresh stack and the given uc_link, ready for makecontext.
 * Kept out of the test functions: a getcontext call there would make the compiler
 * keep their variables in memory, and the tests want them in registers.
 */
static __attribute__((noinline)) void prepare_fiber(ucontext_t *link)
{
	fiber_stack = new_stack();
	CHECK(libucontext_getcontext(&fiber_ctx) == 0);
	fiber_ctx.uc_stack.ss_sp = fiber_stack;
	fiber_ctx.uc_stack.ss_size = STACK_SIZE;
	fiber_ctx.uc_link = link;
}

/* Generator state shared with main */
static long yielded;
static int generator_done;

/* Checks the stack is the fiber's and is aligned as the ABI promises. */
static void check_frame(void)
{
	_Alignas(16) char aligned[16];
	char text[32];

	CHECK(on_stack(opaque(aligned), fiber_stack));
	CHECK(((uintptr_t)opaque(aligned) & 15) == 0);
	/* printf of a double uses SSE stores that need that alignment. */
	snprintf(text, sizeof text, "%.2f", 2.5 * (double)(uintptr_t)opaque((void *)4));
	CHECK(strcmp(text, "10.00") == 0);
}

/* Yields start, start + step, ... (count values) to main, then returns via uc_link. */
static void generator(int start, int step, int count, int four, int minus_five, int six)
{
	char local;

	check_frame();
	CHECK(on_stack(opaque(&local), fiber_stack));
	CHECK(four == 4 && minus_five == -5 && six == 6);
	for (int i = 0; i < count; i++) {
		yielded = start + (long)i * step;
		CHECK(libucontext_swapcontext(&fiber_ctx, &main_ctx) == 0);
		CHECK(on_stack(opaque(&local), fiber_stack));
	}
	generator_done = 1;
}

static void test_generator(void)
{
	/* Values that stay live across the switches, to catch clobbered registers. */
	unsigned long a = (uintptr_t)opaque(&main_ctx), b = a * 3, c = a ^ 0x5a5a, d = a + 7, e = ~a;
	long expect = 100;
	int received = 0;

	prepare_fiber(&main_ctx);
	libucontext_makecontext(&fiber_ctx, (void (*)(void))generator, 6, 100, -7, 5, 4, -5, 6);

	for (;;) {
		CHECK(libucontext_swapcontext(&main_ctx, &fiber_ctx) == 0);
		if (generator_done)
			break;  /* resumed through uc_link: the generator returned */
		CHECK(yielded == expect);
		expect -= 7;
		received++;
	}
	CHECK(received == 5);
	CHECK(b == a * 3 && c == (a ^ 0x5a5a) && d == a + 7 && e == ~a);
	free(fiber_stack);
}

/* Seven and eight arguments: the last ones go on the stack. */
static long result;

static void seven(int a1, int a2, int a3, int a4, int a5, int a6, int a7)
{
	check_frame();
	result = a1 + 10L * a2 + 100L * a3 + 1000L * a4 + 10000L * a5 + 100000L * a6 + 1000000L * a7;
}

static void eight(int a1, int a2, int a3, int a4, int a5, int a6, int a7, long *out)
{
	check_frame();
	*out = a1 + a2 + a3 + a4 + a5 + a6 + a7;
}

static void no_args(void)
{
	check_frame();
	result = -1;
}

static void run(void (*func)(void), int argc, long a7, long a8)
{
	prepare_fiber(&main_ctx);
	libucontext_makecontext(&fiber_ctx, func, argc, 1, 2, 3, 4, 5, 6, a7, a8);
	CHECK(libucontext_swapcontext(&main_ctx, &fiber_ctx) == 0);
	free(fiber_stack);
}

static void test_stack_arguments(void)
{
	long sum = 0;

	result = 0;
	run(no_args, 0, 0, 0);
	CHECK(result == -1);
	run((void (*)(void))seven, 7, 7, 0);
	CHECK(result == 7654321);
	run((void (*)(void))eight, 8, 7, (long)&sum);
	CHECK(sum == 28);
}

/* With uc_link NULL, returning from the function ends the process with status 0. */
static void returns_nowhere(void)
{
}

static void test_null_link_exits(void)
{
	int status;
	pid_t pid;

	fflush(NULL);
	pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		test_completed = 1;  /* the exit expected here is a success */
		prepare_fiber(NULL);
		libucontext_makecontext(&fiber_ctx, returns_nowhere, 0);
		libucontext_swapcontext(&main_ctx, &fiber_ctx);
		_exit(42);  /* not reached */
	}
	CHECK(waitpid(pid, &status, 0) == pid);
	CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

int main(void)
{
	test_start();
	test_generator();
	test_stack_arguments();
	test_null_link_exits();
	return test_done();
}
