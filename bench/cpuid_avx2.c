/* Holds a whole process to AVX2+FMA on an AVX-512 CPU, for `bench/peers.py --isa avx2`.
 *
 * Loaded with LD_PRELOAD, it turns on CPUID faulting for the process (Linux arch_prctl
 * ARCH_SET_CPUID, on CPUs whose /proc/cpuinfo lists `cpuid_fault`): from then on every CPUID
 * instruction raises SIGSEGV, and the handler below runs the real CPUID, clears the AVX-512,
 * AVX-VNNI and AMX feature bits, and resumes after the instruction. Libraries that choose their
 * kernels from CPUID (ONNX Runtime's MLAS has no switch for it; oneDNN, PyTorch, NumPy and our
 * engine have theirs, which the script also sets) then take their AVX2 paths, as on a CPU
 * without AVX-512. Faulting is per process and reset by execve; LD_PRELOAD carries this library
 * into child processes, which arm it again. A program that installs its own SIGSEGV handler
 * (GCC does, Rust's runtime and Python's faulthandler may) gets it chained behind ours instead:
 * `sigaction` and `signal` are wrapped so that the handler stays first and passes on every
 * fault that is not a CPUID.
 *
 * Build: cc -O2 -shared -fPIC -o libcpuid_avx2.so bench/cpuid_avx2.c -ldl
 * Check: LD_PRELOAD=./libcpuid_avx2.so grep -c avx512 /proc/cpuinfo still counts (the kernel's
 * list), but `python -c "import numpy; numpy.show_runtime()"` reports no AVX512 features.
 * Set CPUID_AVX2_VERBOSE=1 to have each armed process say so on stderr.
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define ARCH_SET_CPUID 0x1012

/* The program's own SIGSEGV disposition, which faults other than CPUID go to. */
static struct sigaction previous;
static int armed;
static int (*real_sigaction)(int, const struct sigaction *, struct sigaction *);

static int set_cpuid_faulting(int on) { return (int)syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0 : 1); }

/* Clears the features a CPU without AVX-512 lacks from one CPUID result. */
static void hold_to_avx2(uint32_t leaf, uint32_t subleaf, uint32_t r[4]) {
    if (leaf == 7 && subleaf == 0) {
        /* EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31. */
        r[1] &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31));
        /* ECX: VBMI 1, VBMI2 6, VNNI 11, BITALG 12, VPOPCNTDQ 14. */
        r[2] &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        /* EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX-BF16 22, FP16 23, AMX-TILE 24, AMX-INT8 25. */
        r[3] &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25));
    } else if (leaf == 7 && subleaf == 1) {
        /* EAX: AVX-VNNI 4, AVX512_BF16 5. */
        r[0] &= ~((1u << 4) | (1u << 5));
    }
}

static void on_segv(int sig, siginfo_t *info, void *ctx) {
    ucontext_t *uc = (ucontext_t *)ctx;
    greg_t *g = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)g[REG_RIP];
    if (ip[0] == 0x0f && ip[1] == 0xa2) {
        uint32_t leaf = (uint32_t)g[REG_RAX], subleaf = (uint32_t)g[REG_RCX], r[4];
        set_cpuid_faulting(0);
        __cpuid_count(leaf, subleaf, r[0], r[1], r[2], r[3]);
        set_cpuid_faulting(1);
        hold_to_avx2(leaf, subleaf, r);
        g[REG_RAX] = r[0];
        g[REG_RBX] = r[1];
        g[REG_RCX] = r[2];
        g[REG_RDX] = r[3];
        g[REG_RIP] += 2;
        return;
    }
    /* A real fault: the program's handler, else the default (a crash). */
    if (previous.sa_flags & SA_SIGINFO) {
        previous.sa_sigaction(sig, info, ctx);
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
    } else {
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        real_sigaction(SIGSEGV, &dfl, NULL);
        raise(SIGSEGV);
    }
}

/* Wrapped for SIGSEGV once armed: the program's handler is kept as `previous`, ours stays. */
int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (!real_sigaction) real_sigaction = (int (*)(int, const struct sigaction *, struct sigaction *))dlsym(RTLD_NEXT, "sigaction");
    if (sig != SIGSEGV || !armed) return real_sigaction(sig, act, old);
    if (old) *old = previous;
    if (act) previous = *act;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    return sigaction(sig, &sa, &old) == 0 ? old.sa_handler : SIG_ERR;
}

__attribute__((constructor)) static void arm(void) {
    if (!real_sigaction) real_sigaction = (int (*)(int, const struct sigaction *, struct sigaction *))dlsym(RTLD_NEXT, "sigaction");
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (real_sigaction(SIGSEGV, &sa, &previous) != 0 || set_cpuid_faulting(1) != 0) {
        fprintf(stderr, "cpuid_avx2: cannot turn on CPUID faulting here (needs Linux and a CPU with cpuid_fault); "
                        "this process keeps its AVX-512\n");
        real_sigaction(SIGSEGV, &previous, NULL);
        return;
    }
    armed = 1;
    if (getenv("CPUID_AVX2_VERBOSE")) fprintf(stderr, "cpuid_avx2: process %d held to AVX2\n", (int)getpid());
}
