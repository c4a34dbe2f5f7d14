// Throughput of the multiply-add instructions the engine's products run on, on one core: twelve
// independent accumulators (more than latency x issue rate on any x86 core we know), each
// instruction timed as (elapsed / count). Build and run: cc -O2 -o /tmp/isa_rates bench/isa_rates.c
// && /tmp/isa_rates. Needs an AVX-512 CPU with AVX512-BF16 and AVX512-VNNI (AMD Zen 4, Intel
// Cooper Lake / Sapphire Rapids); the assembler needs no flags (the instructions are in asm).
// Its figures are in bench/RESULTS.md ("This machine").
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define N 50000000L
// Twelve independent accumulators (AT&T operand order: the destination is last).
#define TWELVE(I, R, S, T)                                                                         \
    I " %%" S ", %%" T ", %%" R "0\n" I " %%" S ", %%" T ", %%" R "1\n" I " %%" S ", %%" T ", %%" R "2\n" \
    I " %%" S ", %%" T ", %%" R "3\n" I " %%" S ", %%" T ", %%" R "4\n" I " %%" S ", %%" T ", %%" R "5\n" \
    I " %%" S ", %%" T ", %%" R "6\n" I " %%" S ", %%" T ", %%" R "7\n" I " %%" S ", %%" T ", %%" R "8\n" \
    I " %%" S ", %%" T ", %%" R "9\n" I " %%" S ", %%" T ", %%" R "10\n" I " %%" S ", %%" T ", %%" R "11\n"
#define ZMM(I)                                                                                      \
    ({                                                                                              \
        long n = N;                                                                                 \
        double t = now();                                                                           \
        __asm__ volatile("vpxord %%zmm30, %%zmm30, %%zmm30\n vpxord %%zmm31, %%zmm31, %%zmm31\n1:\n" \
                         TWELVE(I, "zmm", "zmm31", "zmm30") "dec %0\n jnz 1b\n"                     \
                         : "+r"(n)::"xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",   \
                           "xmm8", "xmm9", "xmm10", "xmm11", "xmm14", "xmm15");                     \
        (now() - t) / N / 12 * 1e9;                                                                 \
    })

int main(void) {
    for (int round = 0; round < 2; round++) {
        double fma = ZMM("vfmadd231ps"), bf16 = ZMM("vdpbf16ps"), vnni = ZMM("vpdpbusd");
        printf("ns per instruction on zmm: vfmadd231ps %.3f (16 MACs), vdpbf16ps %.3f (32), vpdpbusd %.3f (64)\n", fma, bf16, vnni);
    }
    return 0;
}
