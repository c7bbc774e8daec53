/* SPDX-License-Identifier: Apache-2.0 */
/* Each context carries its own signal mask, saved and restored by every switch. */
#include <signal.h>

#include "libucontext/libucontext.h"
#include "check.h"

static ucontext_t main_ctx, fiber_ctx, saved;
static volatile sig_atomic_t usr1_count;
static volatile int phase;

static void on_usr1(int sig)
{
	(void)sig;
	usr1_count++;
}

static int blocked(int sig)
{
	sigset_t current;

	CHECK(sigprocmask(SIG_BLOCK, NULL, &current) == 0);
	return sigismember(&current, sig);
}

static void change_mask(int how, int sig)
{
	sigset_t set;

	sigemptyset(&set);
	sigaddset(&set, sig);
	CHECK(sigprocmask(how, &set, NULL) == 0);
}

static void fiber(void)
{
	/* The switch unblocked SIGUSR1, so the signal pending in main was delivered. */
	CHECK(usr1_count == 1);
	CHECK(blocked(SIGUSR2) && !blocked(SIGUSR1) && !blocked(SIGTERM));
	change_mask(SIG_BLOCK, SIGTERM);
	CHECK(libucontext_swapcontext(&fiber_ctx, &main_ctx) == 0);
	/* Back with the mask this fiber had when it switched away. */
	CHECK(blocked(SIGUSR2) && blocked(SIGTERM) && !blocked(SIGUSR1));
}

static void test_swap(void)
{
	char *stack = new_stack();

	CHECK(signal(SIGUSR1, on_usr1) != SIG_ERR);
	change_mask(SIG_BLOCK, SIGUSR1);
	CHECK(raise(SIGUSR1) == 0);
	CHECK(usr1_count == 0);  /* pending */

	/* getcontext records the current mask... */
	CHECK(libucontext_getcontext(&fiber_ctx) == 0);
	CHECK(sigismember(&fiber_ctx.uc_sigmask, SIGUSR1) && !sigismember(&fiber_ctx.uc_sigmask, SIGUSR2));
	/* ...which the fiber replaces with its own: only SIGUSR2 blocked. */
	sigemptyset(&fiber_ctx.uc_sigmask);
	sigaddset(&fiber_ctx.uc_sigmask, SIGUSR2);
	fiber_ctx.uc_stack.ss_sp = stack;
	fiber_ctx.uc_stack.ss_size = STACK_SIZE;
	fiber_ctx.uc_link = &main_ctx;
	libucontext_makecontext(&fiber_ctx, fiber, 0);

	CHECK(libucontext_swapcontext(&main_ctx, &fiber_ctx) == 0);
	CHECK(blocked(SIGUSR1) && !blocked(SIGUSR2) && !blocked(SIGTERM));
	CHECK(libucontext_swapcontext(&main_ctx, &fiber_ctx) == 0);  /* fiber returns via uc_link */
	CHECK(blocked(SIGUSR1) && !blocked(SIGUSR2) && !blocked(SIGTERM));
	CHECK(usr1_count == 1);
	free(stack);
}

/* setcontext restores the mask getcontext saved. */
static void test_set(void)
{
	phase = 0;
	CHECK(libucontext_getcontext(&saved) == 0);
	if (phase == 0) {
		phase = 1;
		change_mask(SIG_UNBLOCK, SIGUSR1);
		change_mask(SIG_BLOCK, SIGHUP);
		CHECK(usr1_count == 1);
		libucontext_setcontext(&saved);
		CHECK(!"setcontext returned");
	}
	CHECK(blocked(SIGUSR1) && !blocked(SIGHUP));
}

int main(void)
{
	test_start();
	test_swap();
	test_set();
	return test_done();
}
