/*
 * Checks, inside a guest, that a task's SIMD registers survive what the
 * guest kernel does between two of its instructions: a task switch (mode
 * "switch", run two copies at once) and a signal handler that clobbers them
 * (mode "signal", on a fresh, never-touched alternate signal stack each
 * time, so the kernel's XSAVE of the signal frame meets unmapped pages).
 * Covers YMM and, where user mode may use AVX-512 (XCR0), ZMM16-31 and
 * the opmask registers too. Prints "ok <checks>" or the first mismatch and
 * exits 1. Built statically by tests/sandbox.rs and copied into the guest.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cpuid.h>

static int has_avx512;

static uint64_t xcr0(void)
{
	unsigned a, b, c, d;
	if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27)))
		return 3; /* no OSXSAVE: x87 and SSE only */
	uint32_t lo, hi;
	__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	return ((uint64_t)hi << 32) | lo;
}

struct regs {
	uint8_t ymm[32] __attribute__((aligned(64)));
	uint8_t zmm[64] __attribute__((aligned(64)));
	uint64_t k;
};

static void fill(struct regs *r, unsigned seed)
{
	for (int i = 0; i < 32; i++)
		r->ymm[i] = (uint8_t)(seed * 131 + i * 7 + 1);
	for (int i = 0; i < 64; i++)
		r->zmm[i] = (uint8_t)(seed * 17 + i * 3 + 5);
	r->k = 0x9e3779b97f4a7c15ull * (seed + 1);
}

/* Loads `in` into ymm7 (and zmm17, k3), runs the system call `nr`, and
 * stores those registers to `out`, all in one asm block so the compiler
 * cannot touch them in between. */
__attribute__((target("avx512f"))) static void
around_syscall_avx512(const struct regs *in, struct regs *out, long nr, long a0, long a1)
{
	long ret = nr;
	__asm__ volatile(
		"vmovdqu %[iy], %%ymm7\n\t"
		"vmovdqu64 %[iz], %%zmm17\n\t"
		"kmovq %[ik], %%k3\n\t"
		"syscall\n\t"
		"vmovdqu %%ymm7, %[oy]\n\t"
		"vmovdqu64 %%zmm17, %[oz]\n\t"
		"kmovq %%k3, %[ok]\n\t"
		: "+a"(ret), [oy] "=m"(out->ymm), [oz] "=m"(out->zmm), [ok] "=m"(out->k)
		: [iy] "m"(in->ymm), [iz] "m"(in->zmm), [ik] "m"(in->k), "D"(a0), "S"(a1)
		: "rcx", "r11", "memory", "xmm7", "xmm17", "k3");
}

__attribute__((target("avx"))) static void
around_syscall_avx(const struct regs *in, struct regs *out, long nr, long a0, long a1)
{
	long ret = nr;
	__asm__ volatile(
		"vmovdqu %[iy], %%ymm7\n\t"
		"syscall\n\t"
		"vmovdqu %%ymm7, %[oy]\n\t"
		: "+a"(ret), [oy] "=m"(out->ymm)
		: [iy] "m"(in->ymm), "D"(a0), "S"(a1)
		: "rcx", "r11", "memory", "xmm7");
}

static void around_syscall(const struct regs *in, struct regs *out, long nr, long a0, long a1)
{
	if (has_avx512) {
		around_syscall_avx512(in, out, nr, a0, a1);
	} else {
		around_syscall_avx(in, out, nr, a0, a1);
		memcpy(out->zmm, in->zmm, sizeof in->zmm);
		out->k = in->k;
	}
}

static int same(const struct regs *a, const struct regs *b, int iter)
{
	const char *what = memcmp(a->ymm, b->ymm, 32) ? "ymm7" :
			   memcmp(a->zmm, b->zmm, 64) ? "zmm17" :
			   a->k != b->k ? "k3" : NULL;
	if (what)
		printf("pid %d: %s changed at iteration %d\n", getpid(), what, iter);
	return what == NULL;
}

__attribute__((target("avx512f"))) static void clobber_avx512(void)
{
	__asm__ volatile("vpternlogd $0xff, %%zmm17, %%zmm17, %%zmm17\n\t"
			 "kxnorq %%k3, %%k3, %%k3" ::: "xmm17", "k3");
}

__attribute__((target("avx"))) static void clobber_avx(void)
{
	__asm__ volatile("vpcmpeqb %%ymm7, %%ymm7, %%ymm7" ::: "xmm7");
}

static void clobber(int sig)
{
	(void)sig;
	if (has_avx512)
		clobber_avx512();
	clobber_avx();
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: %s switch|signal ITERATIONS\n", argv[0]);
		return 2;
	}
	uint64_t x = xcr0();
	if ((x & 6) != 6) {
		printf("skip: user mode has no AVX (xcr0 %#llx)\n", (unsigned long long)x);
		return 0;
	}
	has_avx512 = (x & 0xe0) == 0xe0;
	int iters = atoi(argv[2]);
	int signal_mode = strcmp(argv[1], "signal") == 0;
	struct regs in, out;
	if (signal_mode) {
		struct sigaction sa = { .sa_handler = clobber, .sa_flags = SA_ONSTACK };
		sigaction(SIGUSR1, &sa, NULL);
	}
	for (int i = 0; i < iters; i++) {
		fill(&in, (unsigned)getpid() * 1000003u + (unsigned)i);
		if (signal_mode) {
			size_t len = 64 * 1024;
			void *stack = mmap(NULL, len, PROT_READ | PROT_WRITE,
					   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			stack_t ss = { .ss_sp = stack, .ss_size = len };
			if (stack == MAP_FAILED || sigaltstack(&ss, NULL)) {
				perror("alternate signal stack");
				return 2;
			}
			around_syscall(&in, &out, SYS_kill, getpid(), SIGUSR1);
			ss.ss_flags = SS_DISABLE;
			sigaltstack(&ss, NULL);
			munmap(stack, len);
		} else {
			around_syscall(&in, &out, SYS_sched_yield, 0, 0);
		}
		if (!same(&in, &out, i))
			return 1;
	}
	printf("ok %d%s\n", iters, has_avx512 ? " (with AVX-512)" : "");
	return 0;
}
