/* SPDX-License-Identifier: Apache-2.0 */
/*
 * makecontext for x86_64: lay out ucp's stack and registers so that resuming ucp
 * calls func(arg1, ..., argN) as an ordinary System V function call would.
 */
#include <stdarg.h>
#include <stdint.h>
#include <ucontext.h>

#include "libucontext/libucontext.h"

/* context.S: where func returns to; it resumes uc_link (kept in rbx) or exits. */
extern void __libucontext_trampoline(void) __attribute__((visibility("hidden")));

/* The first six integer arguments travel in registers, the rest on the stack. */
static const int arg_regs[] = {REG_RDI, REG_RSI, REG_RDX, REG_RCX, REG_R8, REG_R9};
#define NUM_ARG_REGS ((int)(sizeof(arg_regs) / sizeof(arg_regs[0])))

__attribute__((visibility("default")))
void libucontext_makecontext(ucontext_t *ucp, void (*func)(void), int argc, ...)
{
	greg_t *gregs = ucp->uc_mcontext.gregs;
	int stack_args = argc > NUM_ARG_REGS ? argc - NUM_ARG_REGS : 0;
	uintptr_t top = (uintptr_t)ucp->uc_stack.ss_sp + ucp->uc_stack.ss_size;
	unsigned long *sp;
	va_list ap;

	/*
	 * From the top of the stack down: room for the stack arguments, padding to a
	 * 16-byte boundary, then the return address. On entry func thus sees
	 * (rsp + 8) % 16 == 0 with its seventh argument at 8(%rsp), as the ABI requires.
	 */
	top -= (uintptr_t)stack_args * sizeof(unsigned long);
	top &= ~(uintptr_t)15;
	sp = (unsigned long *)top - 1;
	sp[0] = (unsigned long)(uintptr_t)__libucontext_trampoline;

	va_start(ap, argc);
	for (int i = 0; i < argc; i++) {
		/* Read as long: callers pass ints and, commonly, pointers. */
		unsigned long arg = va_arg(ap, unsigned long);
		if (i < NUM_ARG_REGS)
			gregs[arg_regs[i]] = (greg_t)arg;
		else
			sp[1 + i - NUM_ARG_REGS] = arg;
	}
	va_end(ap);

	gregs[REG_RIP] = (greg_t)(uintptr_t)func;
	gregs[REG_RSP] = (greg_t)(uintptr_t)sp;
	gregs[REG_RBX] = (greg_t)(uintptr_t)ucp->uc_link;  /* for the trampoline */
	gregs[REG_RBP] = 0;  /* ends frame-pointer walks */
}

/* The standard name; <ucontext.h> declares it (musl spells func's type `void (*)()`). */
__attribute__((visibility("default"), alias("libucontext_makecontext")))
void makecontext(ucontext_t *ucp, void (*func)(void), int argc, ...);
