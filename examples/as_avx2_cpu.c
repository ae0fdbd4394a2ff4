/* as_avx2_cpu: run a program on this x86-64 CPU as if it had AVX2 only.
 *
 * Loaded with LD_PRELOAD (examples/as_avx2_cpu.sh does it), it turns on the kernel's CPUID
 * faulting for the process (arch_prctl ARCH_SET_CPUID 0: Linux >= 4.12 on a CPU or hypervisor
 * with CPUID faulting, the "cpuid_fault" flag of /proc/cpuinfo), so every CPUID instruction
 * traps into the SIGSEGV handler below, which runs the real CPUID and clears the bits of
 * AVX-512 (all of its subsets, FP16 and BF16 included), AVX-VNNI and AMX before handing the
 * answer back. PyTorch (cpuinfo, oneDNN), ONNX Runtime (MLAS), numpy and MKL choose their
 * kernels from CPUID, so they all run their AVX2 code, on the same cores, in the same run as
 * an unmasked process: what geoseg's int8 measurements on "an AVX2-only CPU" use.
 *
 * AS_AVX2_KEEP_AVX_VNNI=1 keeps AVX-VNNI (an AVX2 CPU with VNNI, as Intel's since Alder Lake);
 * AS_AVX2_KEEP_AVX512=1 keeps Skylake-SP's AVX-512 (F, CD, BW, DQ, VL) and its register state,
 * still without VNNI, BF16, FP16 or AMX (an AVX-512 server CPU before Cascade Lake).
 * The setting is inherited by threads and child processes (LD_PRELOAD is). A program that
 * installs its own SIGSEGV handler later (Python's faulthandler, a JVM) breaks the trap.
 * /proc/cpuinfo is not masked.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

static int keep_avx_vnni;
static int keep_avx512;

static void real_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);  /* this thread may run CPUID for a moment */
    __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
}

static void masked_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    real_cpuid(leaf, sub, r);
    if (leaf == 7 && sub == 0) {
        /* EBX: AVX512F, DQ, IFMA, PF, ER, CD, BW, VL (Skylake-SP's F, DQ, CD, BW, VL kept on request) */
        r[1] &= ~(BIT(21) | BIT(26) | BIT(27));
        if (!keep_avx512) r[1] &= ~(BIT(16) | BIT(17) | BIT(28) | BIT(30) | BIT(31));
        /* ECX: AVX512_VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ */
        r[2] &= ~(BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14));
        /* EDX: AVX512_4VNNIW, 4FMAPS, VP2INTERSECT, AMX-BF16, AVX512_FP16, AMX-TILE, AMX-INT8 */
        r[3] &= ~(BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25));
    } else if (leaf == 7 && sub == 1) {
        /* EAX: AVX512_BF16, AMX-FP16, AVX-IFMA (and AVX-VNNI unless kept) */
        r[0] &= ~(BIT(5) | BIT(21) | BIT(23));
        if (!keep_avx_vnni) r[0] &= ~BIT(4);
        /* EDX: AVX-VNNI-INT8, AVX-NE-CONVERT, AVX-VNNI-INT16, AVX10 */
        r[3] &= ~(BIT(4) | BIT(5) | BIT(10) | BIT(19));
    } else if (leaf == 0xd && sub == 0) {
        /* XSAVE state the CPU supports: no AMX tile (17-18) state, nor opmask/ZMM (5-7) without AVX-512 */
        r[0] &= ~(BIT(17) | BIT(18));
        if (!keep_avx512) r[0] &= ~(BIT(5) | BIT(6) | BIT(7));
    }
}

static void on_segv(int sig, siginfo_t *info, void *context) {
    (void)sig; (void)info;
    greg_t *reg = ((ucontext_t *)context)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)reg[REG_RIP];
    if (ip[0] == 0x0f && ip[1] == 0xa2) {  /* CPUID */
        uint32_t r[4];
        masked_cpuid((uint32_t)reg[REG_RAX], (uint32_t)reg[REG_RCX], r);
        reg[REG_RAX] = r[0];
        reg[REG_RBX] = r[1];
        reg[REG_RCX] = r[2];
        reg[REG_RDX] = r[3];
        reg[REG_RIP] += 2;
        return;
    }
    signal(SIGSEGV, SIG_DFL);  /* a real fault: it happens again and ends the program as usual */
}

__attribute__((constructor)) static void start(void) {
    const char *keep = getenv("AS_AVX2_KEEP_AVX_VNNI");
    keep_avx_vnni = keep != NULL && strcmp(keep, "1") == 0;
    keep = getenv("AS_AVX2_KEEP_AVX512");
    keep_avx512 = keep != NULL && strcmp(keep, "1") == 0;
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &action, NULL);
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        fputs("as_avx2_cpu: this CPU or kernel has no CPUID faulting (no cpuid_fault in /proc/cpuinfo); "
              "run on another machine\n", stderr);
        _exit(3);
    }
}
