/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Compile-time proof that the constants in layout.h match the C library's ucontext_t.
 * This file produces no code; a mismatch is a build error.
 */
#include <signal.h>
#include <stddef.h>
#include <sys/syscall.h>
#include <ucontext.h>

#include "layout.h"

#define SAME(a, b) _Static_assert((a) == (b), #a " != " #b)

/* The FP save area type is struct _fpstate (musl) or struct _libc_fpstate (glibc). */
typedef __typeof__(*((mcontext_t *)0)->fpregs) fpstate_t;

SAME(offsetof(ucontext_t, uc_link), UC_LINK);
SAME(offsetof(ucontext_t, uc_mcontext.gregs), UC_GREGS);
SAME(offsetof(ucontext_t, uc_mcontext.fpregs), UC_FPREGS);
SAME(offsetof(ucontext_t, uc_sigmask), UC_SIGMASK);
SAME(offsetof(ucontext_t, __fpregs_mem), UC_FPREGS_MEM);

SAME(sizeof(greg_t), 8);
SAME(REG_R8, GREG_R8);
SAME(REG_R9, GREG_R9);
SAME(REG_R12, GREG_R12);
SAME(REG_R13, GREG_R13);
SAME(REG_R14, GREG_R14);
SAME(REG_R15, GREG_R15);
SAME(REG_RDI, GREG_RDI);
SAME(REG_RSI, GREG_RSI);
SAME(REG_RBP, GREG_RBP);
SAME(REG_RBX, GREG_RBX);
SAME(REG_RDX, GREG_RDX);
SAME(REG_RCX, GREG_RCX);
SAME(REG_RSP, GREG_RSP);
SAME(REG_RIP, GREG_RIP);

SAME(offsetof(fpstate_t, cwd), FP_CWD);
SAME(offsetof(fpstate_t, mxcsr), FP_MXCSR);
/* getcontext points fpregs at __fpregs_mem, so the fields used must fit in it. */
_Static_assert(sizeof(((ucontext_t *)0)->__fpregs_mem) >= FP_MXCSR + 4, "__fpregs_mem too small");

SAME(SYS_rt_sigprocmask, NR_RT_SIGPROCMASK);
SAME(SIG_BLOCK, KSIG_BLOCK);
SAME(SIG_SETMASK, KSIG_SETMASK);
_Static_assert(sizeof(sigset_t) >= KSIGSET_SIZE, "sigset_t smaller than the kernel's");
