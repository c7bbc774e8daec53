/* SPDX-License-Identifier: Apache-2.0 */
/* Helpers shared by the tests. A failed CHECK reports where and exits with status 1. */
#ifndef LIBUCONTEXT_TESTS_CHECK_H
#define LIBUCONTEXT_TESTS_CHECK_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define CHECK(cond)                                                                    \
	do {                                                                               \
		if (!(cond)) {                                                                 \
			fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);  \
			exit(1);                                                                   \
		}                                                                              \
	} while (0)

/*
 * main calls test_start() first and returns test_done(). Exiting any other way, even
 * with status 0 (say, a context returning with no uc_link by mistake), then fails.
 */
static volatile int test_completed;

static void fail_if_incomplete(void)
{
	if (!test_completed) {
		fprintf(stderr, "exited before the end of main\n");
		_exit(1);
	}
}

static inline void test_start(void)
{
	CHECK(atexit(fail_if_incomplete) == 0);
}

static inline int test_done(void)
{
	test_completed = 1;
	return 0;
}

#define STACK_SIZE (256 * 1024)

/* A fresh stack for a context. */
static inline char *new_stack(void)
{
	char *stack = malloc(STACK_SIZE);
	CHECK(stack != NULL);
	return stack;
}

/* Does p point into the STACK_SIZE bytes starting at stack? */
static inline int on_stack(const void *p, const char *stack)
{
	uintptr_t addr = (uintptr_t)p, base = (uintptr_t)stack;
	return addr >= base && addr < base + STACK_SIZE;
}

/* Hide p's origin from the optimizer, so that checks on its value are really made. */
static inline void *opaque(void *p)
{
	__asm__ volatile("" : "+r"(p));
	return p;
}

#endif
