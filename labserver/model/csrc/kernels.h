/* What kernels.c and w4a8.c share: the block size, the way work is split between threads, and the
   W4A8 entry points llama_decode calls. */
#ifndef LABSERVER_KERNELS_H
#define LABSERVER_KERNELS_H

#include <stdint.h>

#define QK 32
#define INLINE static inline __attribute__((always_inline))

/* Without OpenMP (Apple's clang has none) the kernels run on the calling thread alone: a parallel
   region is then that one thread, and its pragmas are ignored. */
#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_max_threads(void) { return 1; }
#endif

/* What a spinning thread does between two looks at a shared counter. */
static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Dispatch a tile of `tb` rows to a specialisation with a constant row count. */
#define EACH_TILE(call)                                                                     \
    switch (tb) {                                                                           \
        case 1: call(1); break; case 2: call(2); break; case 3: call(3); break;             \
        case 4: call(4); break; case 5: call(5); break; case 6: call(6); break;             \
        case 7: call(7); break; default: call(8); break;                                    \
    }

/* A Q4_1 matrix as the kernels take it: q, d, m, then a second layout of the same blocks in panels
   (pq, pd, pm; NULL when it has none): float32 panels for the exact route, W4A8 panels for that one. */
enum { MQ, MD, MM, MPQ, MPD, MPM, MATRIX };

/* Work split between the threads of a parallel region as they come free. Each phase of a step (a product,
   the attention heads, ...) is cut into chunks that a thread takes with one atomic add, so a thread the
   OS preempts (on 2 cores, for the web server's event loop) leaves its work to the other instead of
   holding up the whole step at the next barrier. Every thread of a region calls `team_begin` with the
   same counters (`team_counters_alloc(phases)`, freed by the caller), then opens the same phases in the
   same order:
       work_t w = phase(n, chunk);  for (long i0, i1; take(&w, &i0, &i1);) { items i0 .. i1 - 1 }  */
#define PAD 8  /* longs per counter: one cache line each, so the threads' counters do not share one */
typedef struct {
    long n, chunk, *next, once;
} work_t;

long *team_counters_alloc(long phases);
void team_begin(long *counters, long phases);
work_t phase(long n, long chunk);
int take(work_t *w, long *i0, long *i1);

/* Activations of M rows quantized to 8 bits per block of 32: q [M, K]; per block [M, K/32] the scale d,
   the float sum s of x and the integer sum qs of q. */
typedef struct {
    int8_t *q;
    float *d, *s;
    int32_t *qs;
} act8_t;

/* y = x . W^T (y += with `add`) with float32 activations, one phase for every thread of a team: a Q4_1
   matrix (its MATRIX pointers) and a Q8_0 one (kernels.c). */
void q4_1_share(const float *x, long M, long K, const void *const *w, long N, float *y, int add);
void q8_0_share(const float *x, long M, long K, const int8_t *q, const float *d, long N, float *y, int add);

act8_t act8_alloc(long M, long K);
void act8_free(act8_t a);
void act8_share(const float *x, long M, long K, act8_t a);
void w4a8_share(act8_t a, long M, long K, const void *const *w, long N, float *y, int add);
void w8a8_share(act8_t a, long M, long K, const void *const *w, long N, float *y, int add);

#endif
