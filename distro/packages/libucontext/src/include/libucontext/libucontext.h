/* SPDX-License-Identifier: Apache-2.0 */
/*
 * libucontext: getcontext, setcontext, makecontext and swapcontext for C libraries that
 * declare them in <ucontext.h> but do not implement them (musl).
 *
 * The library exports every function twice: under its standard name, so that programs
 * written against <ucontext.h> only need to link -lucontext, and with a `libucontext_`
 * prefix, which always reaches this implementation even where the C library has its own.
 * Both operate on the C library's ucontext_t.
 */
#ifndef LIBUCONTEXT_LIBUCONTEXT_H
#define LIBUCONTEXT_LIBUCONTEXT_H

#include <ucontext.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Like setjmp, getcontext may return more than once; tell the compiler so. */
#if defined(__GNUC__) || defined(__clang__)
#define LIBUCONTEXT_RETURNS_TWICE __attribute__((__returns_twice__))
#else
#define LIBUCONTEXT_RETURNS_TWICE
#endif

/* Save the calling thread's context (registers, signal mask, FP control state) into ucp. */
int libucontext_getcontext(ucontext_t *ucp) LIBUCONTEXT_RETURNS_TWICE;

/* Resume the context in ucp. Returns -1 (and sets errno) only on failure. */
int libucontext_setcontext(const ucontext_t *ucp);

/*
 * Prepare ucp (first filled by getcontext, with uc_stack and uc_link set) to run
 * func(arg1, ..., argN) on ucp->uc_stack. Arguments are read as `long`, so integers
 * and pointers may be passed. When func returns, ucp->uc_link is resumed, or the
 * process exits with status 0 when uc_link is NULL.
 */
void libucontext_makecontext(ucontext_t *ucp, void (*func)(void), int argc, ...);

/* Save the current context into oucp and resume ucp. Returns -1 on failure. */
int libucontext_swapcontext(ucontext_t *oucp, const ucontext_t *ucp);

#ifdef __cplusplus
}
#endif

#endif
