/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Byte offsets into the C library's x86_64 ucontext_t, for the assembly in context.S.
 *
 * Assembly cannot use offsetof, so the numbers are written out here; layout_check.c
 * compares every one of them with offsetof/REG_* from <ucontext.h> at compile time, so
 * a C library with a different layout fails the build instead of corrupting memory.
 * This file holds only #defines: it is included from both C and assembly.
 */
#ifndef LIBUCONTEXT_X86_64_LAYOUT_H
#define LIBUCONTEXT_X86_64_LAYOUT_H

/* ucontext_t members */
#define UC_LINK        8    /* struct ucontext *uc_link */
#define UC_GREGS       40   /* uc_mcontext.gregs[23] */
#define UC_FPREGS      224  /* uc_mcontext.fpregs: pointer to the FP save area */
#define UC_SIGMASK     296  /* sigset_t uc_sigmask */
#define UC_FPREGS_MEM  424  /* __fpregs_mem: storage that fpregs points to after getcontext */

/* Indices into gregs[] (the REG_* constants of <sys/ucontext.h>) */
#define GREG_R8   0
#define GREG_R9   1
#define GREG_R12  4
#define GREG_R13  5
#define GREG_R14  6
#define GREG_R15  7
#define GREG_RDI  8
#define GREG_RSI  9
#define GREG_RBP  10
#define GREG_RBX  11
#define GREG_RDX  12
#define GREG_RCX  14
#define GREG_RSP  15
#define GREG_RIP  16

/* Byte offset of gregs[reg] inside ucontext_t */
#define GREG(reg)  (UC_GREGS + 8 * GREG_##reg)

/* Fields of the FXSAVE-format area that fpregs points to (struct _fpstate) */
#define FP_CWD    0    /* x87 control word */
#define FP_MXCSR  24   /* SSE control/status register */

/* rt_sigprocmask(2) */
#define NR_RT_SIGPROCMASK  14
#define KSIG_BLOCK         0
#define KSIG_SETMASK       2
#define KSIGSET_SIZE       8   /* the kernel's sigset_t: 64 signals */

#endif
